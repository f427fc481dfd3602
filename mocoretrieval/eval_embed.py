"""Embeddings for evaluation: the models to compare, by name, and image sets through the
index's pipeline — stored embeddings reused, raw pixels as the floor, in-memory arrays too."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .embed import iter_embeddings
from .embedder import Embedder, EncoderConfig
from .errors import IndexFormatError, MoCoRetrievalError
from .layout import DATABASE, DEFAULT_DIRNAME, read_manifest
from .preprocess import Preprocess

logger = logging.getLogger(__name__)

# The model name of the raw-pixel baseline, accepted wherever eval takes a model.
RAW_PIXELS = "raw-pixels"
Progress = Callable[[int], None]  # told how many more images are done


class RawPixels:
    """The floor every encoder must beat: the image's pixels as its embedding.

    The evaluation transform at ``size`` pixels (resize the short side, centre crop), each
    image's mean removed (so that a brightness change moves it less) and L2-normalised. It has
    the encoders' embedding protocol, so it runs through the same pipeline.

    Args:
        size: side of the square it looks at; 28 keeps Fashion-MNIST's pixels as they are.
    """

    backend = "raw"
    is_resnet = False
    quantize = None

    def __init__(self, size: int = 32) -> None:
        self.input_size = self.resize_size = int(size)
        self.dim = 3 * self.input_size**2

    @property
    def config(self) -> EncoderConfig:
        """Its preprocessing, as an encoder's config says it (``arch`` names the baseline)."""
        return EncoderConfig(
            arch=RAW_PIXELS,
            input_size=self.input_size,
            resize_size=self.resize_size,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            source=RAW_PIXELS,
        )

    @property
    def preprocess(self) -> Preprocess:
        c = self.config
        return Preprocess(c.resize_size, c.input_size, c.mean, c.std)

    def embed(self, images: Sequence[Image.Image] | torch.Tensor) -> np.ndarray:
        batch = images if isinstance(images, torch.Tensor) else self.preprocess.batch(images)
        x = batch.detach().cpu().float().reshape(len(batch), -1)  # (N, 3 * S * S)
        x = x - x.mean(1, keepdim=True)
        return torch.nn.functional.normalize(x, dim=1).numpy()

    def weights_hash(self) -> str:
        return hashlib.sha256(f"{RAW_PIXELS}-{self.input_size}".encode()).hexdigest()

    def __repr__(self) -> str:
        return f"RawPixels(size={self.input_size})"


def load_models(
    models: Sequence[Embedder | str | os.PathLike],
    *,
    backend: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    calibration_images: Iterable[str | Path] | None = None,
    calibrated_on: str | None = None,
    notify: Callable[[str], None] | None = None,
    raw_size: int = 32,
) -> list[tuple[str, Embedder]]:
    """``(name, encoder)`` of each model to evaluate, in order.

    Args:
        models: model sources (as ``index --model`` takes them), :data:`RAW_PIXELS`,
            encoders already loaded, or any object with their embedding protocol (``embed``,
            ``preprocess``, ``resize_size``, ``dim``; ``weights_hash`` to reuse an index).
        backend, device, notify: see :func:`~mocoretrieval.models.load_backend`.
        quantize: ``int8``: each model is evaluated as given and quantized, side by side.
        calibration_images, calibrated_on: the images int8 is calibrated on, and the folder
            they stand for.
        raw_size: side of the raw-pixel baseline.
    """
    from .models import load_backend

    out: list[tuple[str, Embedder]] = []
    for model in models:
        if isinstance(model, str) and model == RAW_PIXELS:
            out.append((RAW_PIXELS, RawPixels(raw_size)))
            continue
        name = str(model) if isinstance(model, (str, os.PathLike)) else _name_of(model)
        if _is_embedder(model):  # e.g. a baseline or a stand-in: used as it is
            out.append((name, model))
            continue
        out.append((name, load_backend(model, backend, device, notify=notify)))
        if quantize is not None:
            encoder = load_backend(
                model,
                backend,
                device,
                quantize=quantize,
                calibration_images=calibration_images,
                calibrated_on=calibrated_on,
                notify=notify,
            )
            out.append((f"{name} ({quantize})", encoder))
    if len({name for name, _ in out}) < len(out):
        raise MoCoRetrievalError("a model is listed twice; give each --model once")
    return out


def _is_embedder(model: object) -> bool:
    """Has the embedding protocol but is neither a source nor an encoder load_backend takes."""
    from .encoder import MoCoEncoder
    from .onnx_backend import OnnxEncoder

    if isinstance(model, (str, os.PathLike, MoCoEncoder, OnnxEncoder)):
        return False
    return all(hasattr(model, a) for a in ("embed", "preprocess", "dim", "resize_size"))


def _name_of(encoder: Embedder) -> str:
    source = getattr(encoder, "loaded_from", None) or getattr(encoder, "source", None)
    return str(source) if source else f"{getattr(encoder, 'arch', type(encoder).__name__)}"


@dataclass
class EmbeddedSet:
    """The embeddings of an image set, in the order asked, without the files that failed.

    Attributes:
        paths: the embedded files.
        vectors: (len(paths), D) float32, L2-normalised.
        skipped: (path, reason) of the files that could not be read.
        reused: how many vectors came from an index of the same model instead of the model.
    """

    paths: list[str]
    vectors: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0


def stored_vectors(
    encoder: Embedder, root: str | Path, relpaths: Sequence[str]
) -> dict[str, np.ndarray]:
    """The vectors an index of ``root`` (in ``root/.mocoretrieval``) holds for ``relpaths``.

    Only an index pinned to the same weights, for files unchanged since (size and mtime), and
    never for a quantized model: the index does not record whether int8 made its vectors, so
    the two are never mixed up.
    """
    index_dir = Path(root) / DEFAULT_DIRNAME
    if getattr(encoder, "quantize", None) or not hasattr(encoder, "weights_hash"):
        return {}
    if not (index_dir / DATABASE).is_file():
        return {}
    from .store import Store

    try:
        manifest = read_manifest(index_dir)
        pinned = manifest["encoder"]
        if pinned["weights_hash"] != encoder.weights_hash() or int(pinned["dim"]) != encoder.dim:
            return {}
        if (index_dir / manifest["root"]).resolve() != Path(root).resolve():
            return {}
        store = Store(index_dir / DATABASE, int(pinned["dim"]), readonly=True)
    except (IndexFormatError, KeyError, ValueError, TypeError) as e:
        logger.info("not reusing the index at %s: %s", index_dir, e)
        return {}
    try:
        records = store.files()
        wanted: dict[int, str] = {}
        for path in relpaths:
            record = records.get(path)
            if record is None or record.vector_id is None:
                continue
            try:
                st = os.stat(Path(root) / path)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (record.size, record.mtime_ns):
                wanted[record.vector_id] = path
        if not wanted:
            return {}
        found: dict[str, np.ndarray] = {}
        wanted_ids = np.fromiter(wanted, dtype=np.int64, count=len(wanted))
        for ids, vectors in store.iter_vectors():  # chunk by chunk: only the wanted ones kept
            keep = np.isin(ids, wanted_ids)
            found.update(zip((wanted[int(i)] for i in ids[keep]), vectors[keep]))
        return found
    finally:
        store.close()


def embed_files(
    encoder: Embedder,
    root: str | Path,
    relpaths: Sequence[str],
    *,
    reuse: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> EmbeddedSet:
    """Embeds image files with the index's pipeline (worker decoding, batching, skipping).

    Args:
        encoder: any encoder of :func:`load_models`.
        root: the folder ``relpaths`` are relative to.
        relpaths: the files.
        reuse: take the vectors an index of ``root`` holds for the same model.
        batch_size, workers, device: see :func:`~mocoretrieval.embed.iter_embeddings`.
        progress: told the number of files done after each batch.
    """
    stored = stored_vectors(encoder, root, relpaths) if reuse else {}
    if stored and progress is not None:
        progress(len(stored))
    todo = [p for p in relpaths if p not in stored]
    found: dict[str, np.ndarray] = dict(stored)
    skipped: list[tuple[str, str]] = []
    for batch in iter_embeddings(
        encoder,
        root,
        todo,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
        thumbnail_size=None,
    ):
        found.update(zip(batch.paths, batch.vectors))
        skipped += batch.skipped
    paths = [p for p in relpaths if p in found]
    dim = int(encoder.dim)
    vectors = np.stack([found[p] for p in paths]) if paths else np.zeros((0, dim), np.float32)
    return EmbeddedSet(paths, vectors.astype(np.float32), skipped, len(stored))


def embed_arrays(
    encoder: Embedder,
    images: np.ndarray,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> np.ndarray:
    """Embeds in-memory grayscale or RGB uint8 images, (N, H, W) or (N, H, W, 3), as PIL images
    through the encoder's own transform: no files, no decoding."""
    out = []
    pre = encoder.preprocess
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    for s in range(0, len(images), batch_size):
        chunk = [Image.fromarray(a).convert("RGB") for a in images[s : s + batch_size]]
        out.append(np.asarray(encoder.embed(pre.batch(chunk)), np.float32))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, int(encoder.dim)), np.float32)
