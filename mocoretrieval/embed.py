"""Embedding image files in batches: decoding in worker processes (`decode_pool`), the model here."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .decode_items import DecodedBatch, ImageFileDataset
from .decode_pool import decode_batches
from .embedder import Embedder
from .errors import MoCoRetrievalError
from .preprocess import Preprocess

logger = logging.getLogger(__name__)

# Decoding a multi-megapixel JPEG in draft mode, plus the transform, costs ~20-30 ms of CPU
# against ~130-170 ms for a ResNet-50 forward (benchmarks/RESULTS.md, index_throughput), so a
# few workers keep a CPU model fed; more would only take cores from it.
MAX_AUTO_WORKERS = 4
# The app's gallery thumbnails (also the side app.thumbnails decodes files to when the index
# has none): made while the image is decoded.
DEFAULT_THUMBNAIL_SIZE = 320


@dataclass
class EmbeddedBatch:
    """The outcome of one batch of files, in input order.

    Attributes:
        paths: the files embedded, relative to the root.
        vectors: (len(paths), D) float32, L2-normalised rows, aligned with ``paths``.
        skipped: (relative path, reason) of the files that could not be used.
        thumbnails: a small JPEG per embedded file, aligned with ``paths`` (None where one could
            not be made); empty when none were asked for.
        frames: ``(timestamp s, duration s)`` per row for a video's keyframes, None for an
            image, aligned with ``paths``, where a video's path repeats once per keyframe (see
            :mod:`mocoretrieval.video`); empty when the batch has no video.
    """

    paths: list[str]
    vectors: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    thumbnails: list[bytes | None] = field(default_factory=list)
    frames: list[tuple[float, float] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files) + len(self.skipped)

    @property
    def files(self) -> list[str]:
        """The files embedded, each once (a video has a row per keyframe in ``paths``)."""
        return list(dict.fromkeys(self.paths))

    def drop_non_finite(self) -> None:
        """Moves the files whose embedding holds NaN or infinity to ``skipped``: such a vector
        would poison every search (a NaN score sorts anywhere) and must never be stored."""
        finite = np.isfinite(self.vectors).all(axis=1)
        if finite.all():
            return
        reason = "embedding is not finite (NaN or infinity): check the model's config"
        bad = {p for p, ok in zip(self.paths, finite) if not ok}  # a video: all its frames go
        keep = np.array([p not in bad for p in self.paths], dtype=bool)
        self.skipped += [(p, reason) for p in dict.fromkeys(p for p in self.paths if p in bad)]
        if self.thumbnails:
            self.thumbnails = [t for t, ok in zip(self.thumbnails, keep) if ok]
        if self.frames:
            self.frames = [f for f, ok in zip(self.frames, keep) if ok]
        self.paths = [p for p, ok in zip(self.paths, keep) if ok]
        self.vectors = self.vectors[keep]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to run on: ``device`` when given, else CUDA when available, else CPU.

    Raises:
        MoCoRetrievalError: ``device`` is not a device name, or names CUDA where there is none.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MoCoRetrievalError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or leave it out to "
            "pick automatically"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoCoRetrievalError(
            f"device {device!r} was asked for but CUDA is not available; use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MoCoRetrievalError(
            f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s), "
            "numbered from 0"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MoCoRetrievalError(f"device {device!r} is not available here; use --device cpu")
    return dev


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_workers(num_files: int, device: torch.device | str = "cpu") -> int:
    """Default number of decoding processes for ``num_files`` files on ``device``.

    On CPU the model needs the cores, and draft-mode decoding costs about a tenth of a
    ResNet-50 forward, so :data:`MAX_AUTO_WORKERS` at most. On GPU decoding is the bottleneck:
    every core but the one feeding the GPU. Even a single file is decoded in a worker (~0.1 s
    to start one): a file that crashes the decoder then ends that worker, not the run.
    """
    if num_files < 1:
        return 0
    cpus = available_cpus()
    if torch.device(device).type == "cuda":
        return min(num_files, max(1, cpus - 1))
    return min(num_files, max(1, min(cpus, MAX_AUTO_WORKERS)))


def default_batch_size(encoder: Embedder, device: torch.device | str = "cpu") -> int:
    """Images per forward pass when none is asked for: 8 for a torch model on CPU, else 32.

    Measured on 2 cores with ResNet-50 (benchmarks/RESULTS.md, index_throughput 06:37 and the
    onnx_vs_torch notes): torch on CPU ran the model alone at 22.3 images/s with batches of 8
    against 14.9 with 32, and this pipeline over 153 photos at 15.7 against 13.6; onnxruntime
    indexed them at 20.1 images/s with 32 against 19.1 with 8; a GPU wants large batches.
    """
    on_cpu = torch.device(device).type == "cpu"
    return 8 if on_cpu and isinstance(encoder, torch.nn.Module) else 32


def plan_chunks(
    n: int, batch_size: int, parts: int, first_batch: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Splits ``range(n)`` into model batches, each cut into ``parts`` chunks.

    Args:
        n: number of items.
        batch_size: items per model batch.
        parts: chunks per model batch (fewer when a batch has fewer items).
        first_batch: size of the first model batch, when it differs.

    Returns:
        The chunks (lists of indices, in order) and how many chunks each model batch has.
    """
    chunks: list[list[int]] = []
    per_batch: list[int] = []
    start = 0
    while start < n:
        size = min(first_batch if first_batch and not per_batch else batch_size, n - start)
        k = min(parts, size)
        bounds = [start + size * j // k for j in range(k + 1)]
        chunks += [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        per_batch.append(k)
        start += size
    return chunks, per_batch


def _prepare_encoder(encoder: Embedder, device: torch.device) -> torch.memory_format | None:
    """Moves a torch encoder to ``device``; returns the input memory format it wants."""
    if not isinstance(encoder, torch.nn.Module):
        return None  # e.g. the ONNX runtime backend: it owns its device and layout
    encoder.to(device)
    encoder.eval()
    if getattr(encoder, "is_resnet", False):
        # NHWC convolutions run 1.35-1.7x faster than NCHW on CPU (measured for issue 3) and
        # use the tensor cores' native layout on GPU; weights and inputs must both be NHWC.
        encoder.to(memory_format=torch.channels_last)
        return torch.channels_last
    return None


def iter_embeddings(
    encoder: Embedder,
    root: str | Path,
    relpaths: Sequence[str],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    prefetch_factor: int = 2,
    thumbnail_size: int | None = DEFAULT_THUMBNAIL_SIZE,
) -> Iterator[EmbeddedBatch]:
    """Decodes and embeds image files batch by batch, yielding results in input order.

    A file that cannot be decoded is reported in ``EmbeddedBatch.skipped`` with its reason; the
    run goes on. Every batch of ``relpaths`` yields one :class:`EmbeddedBatch`, also when all of
    its files were skipped, so a caller can commit after each one.

    Args:
        encoder: a :class:`~mocoretrieval.MoCoEncoder` or any object with its embedding
            protocol: ``preprocess``, ``resize_size``, ``embed(tensor_batch) -> (N, D) array``
            and ``is_resnet``. A ``torch.nn.Module`` is moved to ``device``.
        root: the folder ``relpaths`` are relative to.
        relpaths: the files to embed.
        batch_size: images per forward pass; None picks (see :func:`default_batch_size`).
        workers: decoding processes; None picks (see :func:`auto_workers`), 0 decodes in this
            process. A file that crashes, hangs or fails its decoder is skipped with its reason
            (see :func:`mocoretrieval.decode_pool.decode_batches`).
        device: torch device; None picks CUDA when available, else CPU.
        progress: called after each batch with the number of files that batch finished
            (embedded + skipped), e.g. ``tqdm.update``.
        prefetch_factor: chunks (a batch's share) each worker decodes ahead.
        thumbnail_size: longest side of the JPEG thumbnails made in the decoding workers from
            the image decoded for the model (so never larger than it); None makes none.

    Returns:
        An iterator of one :class:`EmbeddedBatch` per batch of ``relpaths``; arguments are
        checked, and the device resolved, before it is returned.

    Raises:
        MoCoRetrievalError: a bad ``batch_size``, ``workers`` or ``device``.
    """
    if batch_size is not None and batch_size < 1:
        raise MoCoRetrievalError(f"batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise MoCoRetrievalError(f"workers must be 0 or more, got {workers}")
    relpaths = list(relpaths)
    dev = resolve_device(device)
    if not relpaths:
        return iter(())
    memory_format = _prepare_encoder(encoder, dev)
    if batch_size is None:
        batch_size = default_batch_size(encoder, dev)
    if workers is None:
        workers = auto_workers(len(relpaths), dev)
    # Each model batch is decoded as one chunk per worker, so that all workers decode it
    # together; the first batch is a quarter size, so that the model starts after a quarter of
    # the decoding latency, and the workers decode the next batches while it runs.
    first_batch = max(workers, batch_size // 4) if workers else None
    chunks, chunks_per_batch = plan_chunks(
        len(relpaths), batch_size, max(workers, 1), first_batch=first_batch
    )
    # With a Preprocess (both backends have one), workers send uint8 crops (a quarter of the
    # bytes) and the batch is normalised here at once; any other transform runs whole in them.
    pre = encoder.preprocess
    split = isinstance(pre, Preprocess)
    dataset = ImageFileDataset(
        root,
        relpaths,
        pre.pixels if split else pre,
        min_side=encoder.resize_size,
        thumbnail_size=thumbnail_size,
    )
    decoded = decode_batches(
        dataset,
        chunks,
        chunks_per_batch,
        workers=workers,
        prefetch_factor=prefetch_factor,
        pin_memory=dev.type == "cuda",
    )
    logger.debug("embedding %d files on %s with %d workers", len(relpaths), dev, workers)
    return _embed_batches(
        encoder,
        decoded,
        relpaths,
        dev,
        memory_format,
        progress,
        thumbnails=bool(thumbnail_size),
        normalize=pre.normalize if split else None,
    )


def worker_died(e: BaseException) -> bool:
    """Whether ``e`` reports a torch DataLoader worker that died (signal, crash), for callers
    that run a DataLoader of their own: :func:`iter_embeddings` raises no such error (its
    decoding pool turns a dead worker into a skipped file).

    torch says so with a RuntimeError; when the worker dies after queueing a batch, receiving
    that batch's shared memory from it fails first, with a ConnectionError or an EOFError.
    """
    if isinstance(e, (ConnectionError, EOFError)):
        return True
    return isinstance(e, RuntimeError) and "DataLoader worker" in str(e)


def raise_if_worker_died(e: BaseException, done: int) -> None:
    """Raises the error a user gets for a decoding worker that died (see :func:`worker_died`)
    after ``done`` files were saved; returns for any other error, for the caller to re-raise.
    """
    if worker_died(e):
        raise MoCoRetrievalError(
            f"a decoding worker died ({e}); the {done} files done so far are saved: run the "
            "same command again to continue"
        ) from e


def _embed_batches(
    encoder: Embedder,
    decoded: Generator[list[DecodedBatch], None, None],
    relpaths: list[str],
    dev: torch.device,
    memory_format: torch.memory_format | None,
    progress: Callable[[int], None] | None,
    thumbnails: bool,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Iterator[EmbeddedBatch]:
    fmt = memory_format or torch.contiguous_format
    dim = int(getattr(encoder, "dim", 0))

    def finish(parts: list[DecodedBatch]) -> EmbeddedBatch:
        skipped = [(relpaths[i], reason) for part in parts for i, reason in part.failed]
        for path, reason in skipped:
            logger.info("skipped %s: %s", path, reason)
        images = [p.images.to(dev, non_blocking=True) for p in parts if p.images is not None]
        if images:
            # Not around the yield: inference mode is thread state and would leak to the caller.
            with torch.inference_mode():
                batch = images[0] if len(images) == 1 else torch.cat(images)
                if normalize is not None:
                    batch = normalize(batch)  # on the device: uint8 travels, floats do not
                vectors = np.asarray(encoder.embed(batch.to(memory_format=fmt)), dtype=np.float32)
        else:
            vectors = np.zeros((0, dim), dtype=np.float32)
        thumbs = (
            [t for p in parts for t in (p.thumbnails or [None] * len(p.indices))]
            if thumbnails
            else []
        )
        frames = (
            [f for p in parts for f in (p.frames or [None] * len(p.indices))]
            if any(p.frames for p in parts)
            else []
        )
        out = EmbeddedBatch(
            [relpaths[i] for p in parts for i in p.indices], vectors, skipped, thumbs, frames
        )
        if progress is not None:
            progress(len(out))
        return out

    try:
        for parts in decoded:
            yield finish(parts)
    finally:
        decoded.close()  # stops the workers now, also when the caller stops early
