"""Where a model source becomes an embedder, and where an index is opened with one.

A source is an alias, a local directory, an official checkpoint or a Hub id (resolved by
:mod:`mocoretrieval.sources` into a `MoCoEncoder`), or an ``.onnx`` file (an `OnnxEncoder`).
Here the backend is chosen (torch, or onnxruntime through the export cache of
:mod:`mocoretrieval.onnx_cache`), the index's own model is deferred until there is work for it,
and :func:`open_index` hands `ImageIndex` the embedder: the CLI and the app open every index
through it.

`ImageIndex` does not import this module: given a model by name, it calls the loader this
module registers on it when imported (the package ``__init__`` imports it), :func:`load_model`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image

from . import embed, sources
from .embedder import DeferredModel, Embedder
from .encoder import MoCoEncoder
from .errors import BackendError, MoCoRetrievalError
from .index import ImageIndex
from .layout import find_index_dir, read_manifest
from .onnx_backend import OnnxEncoder
from .onnx_cache import cached_onnx
from .sources import normalize_source

__all__ = [
    "BACKENDS",
    "choose_backend",
    "index_model",
    "is_onnx_file",
    "load_backend",
    "load_model",
    "normalize_source",
    "open_index",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "auto")

ModelArg = Embedder | str | os.PathLike | DeferredModel | None


def is_onnx_file(source: object) -> bool:
    """Whether ``source`` names an exported ``.onnx`` model (not a source to export)."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".onnx")


def load_model(source: str | os.PathLike, device: str | None = None) -> Embedder:
    """The embedder a model source names, as the index loads one: an ``.onnx`` file with
    onnxruntime, any other source with torch on ``device`` (None: a GPU when there is one)."""
    if is_onnx_file(source):
        return load_backend(source, "onnx", device)
    return sources.load(normalize_source(source), device=embed.resolve_device(device))


def _load_for_index(source: str | os.PathLike, device: str | None) -> Embedder:
    return load_model(source, device)  # looked up per call: `models.load_model` is the one entry


# `ImageIndex` resolves a model given by name here; index.py does not import this module.
ImageIndex._load_model = staticmethod(_load_for_index)


# --- the backend ----------------------------------------------------------------------------


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def choose_backend(backend: str = "auto", device: str | None = None) -> tuple[str, str]:
    """Resolves ``(backend, device)``: ``auto`` is onnxruntime on CPU and torch on a GPU.

    On CPU onnxruntime's fused kernels embed 1.7-2.8x faster than torch eager (issue 6,
    benchmarks/RESULTS.md); on a GPU torch is the well-trodden path.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device is None:
        # An explicit onnx backend runs where onnxruntime's default build runs: the CPU.
        device = "cuda" if backend != "onnx" and _cuda_available() else "cpu"
    device = str(device)
    if backend == "auto":
        backend = "torch" if device.startswith("cuda") else "onnx"
    return backend, device


def load_backend(
    source: str | os.PathLike | MoCoEncoder | OnnxEncoder,
    backend: str = "auto",
    device: str | None = None,
    cache_dir: str | Path | None = None,
    quantize: str | None = None,
    calibration_images: Iterable[str | Path | Image.Image] | None = None,
    threads: int | None = None,
    notify: Callable[[str], None] | None = None,
    calibrated_on: str | None = None,
) -> MoCoEncoder | OnnxEncoder:
    """Loads an encoder for embedding with the chosen backend.

    Args:
        source: a model source :meth:`MoCoEncoder.from_pretrained` accepts, a loaded encoder,
            or an ``.onnx`` file written by :func:`~mocoretrieval.onnx_export.export_onnx`.
        backend: ``torch``, ``onnx`` or ``auto`` (see :func:`choose_backend`).
        device: ``cpu``, ``cuda``...; default, a GPU when there is one.
        cache_dir: where exports are cached; default
            :func:`~mocoretrieval.onnx_cache.default_cache_dir`.
        quantize: ``int8`` for a statically quantized onnxruntime model (implies onnx).
        calibration_images: images (paths or PIL) to calibrate int8 on, needed the first time.
        threads: onnxruntime intra-op threads; default, all cores.
        notify: told before a one-time export or quantization starts (see
            :func:`~mocoretrieval.onnx_cache.cached_onnx`).
        calibrated_on: what the int8 calibration images stand for (the folder): one cached
            int8 model per value.

    Returns:
        A :class:`MoCoEncoder` (torch) or an :class:`OnnxEncoder`; both are an
        :class:`~mocoretrieval.embedder.Embedder`.
    """
    if quantize is not None and backend == "torch":
        raise BackendError("--quantize int8 runs on onnxruntime; use --backend onnx or auto")
    backend, device = choose_backend("onnx" if quantize and backend == "auto" else backend, device)
    if isinstance(source, OnnxEncoder) or is_onnx_file(source):
        if backend == "torch":
            raise BackendError(f"{source} is an ONNX model; use --backend onnx or auto with it")
        if quantize is not None:
            raise BackendError("--quantize applies to a model source, not to an .onnx file")
        if isinstance(source, OnnxEncoder):
            return source
        return OnnxEncoder(source, threads=threads, device=device)
    if isinstance(source, MoCoEncoder):
        encoder = source
    else:
        encoder = MoCoEncoder.from_pretrained(
            normalize_source(source), device="cpu" if backend == "onnx" else device
        )
    if backend == "torch":
        return encoder.to(device).eval()
    try:
        path = cached_onnx(
            encoder,
            cache_dir,
            quantize,
            calibration_images,
            notify=notify,
            calibrated_on=calibrated_on,
        )
    except OSError as e:  # e.g. a read-only home, a full disk, a file where the folder goes
        if quantize is not None:
            raise BackendError(
                f"cannot write the int8 model to the ONNX cache ({e}); set MOCORETRIEVAL_CACHE "
                "to a writable folder"
            ) from e
        logger.warning(
            "cannot use the ONNX cache (%s); embedding with torch instead (set "
            "MOCORETRIEVAL_CACHE to a writable folder for onnxruntime)",
            e,
        )
        return encoder.to(device).eval()
    logger.info("embedding with onnxruntime (%s)", path.name)
    onnx_encoder = OnnxEncoder(path, threads=threads, device=device, config=encoder.config)
    onnx_encoder.loaded_from = getattr(encoder, "loaded_from", None)
    return onnx_encoder


# --- the model of an index ------------------------------------------------------------------


def index_model(
    model: ModelArg = None,
    backend: str = "auto",
    device: str | None = None,
    *,
    index_dir: str | Path | None = None,
    root: str | Path | None = None,
    quantize: str | None = None,
    cache_dir: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
    exclude: Sequence[str] | None = None,
) -> ModelArg:
    """The ``model`` to give :class:`~mocoretrieval.index.ImageIndex` for the chosen backend.

    With torch, a model source loaded by :func:`load_model` (an embedder unchanged); with
    onnx, an :class:`OnnxEncoder` of ``model``. With either and no ``model``, a
    :class:`~mocoretrieval.embedder.DeferredModel` of the source the existing index was built
    with (loaded only if there is work), else the default model. The index is handed an
    embedder, never a name to resolve, and checks its weights hash like any encoder's.

    Args:
        model: a model source or encoder, or None for the index's own.
        backend, device, quantize, cache_dir, notify: see :func:`load_backend`.
        index_dir: the index directory, or an indexed folder; None looks in ``root`` (or the
            current folder and its parents when ``root`` is None too).
        root: the image folder being indexed; int8 is calibrated on a sample of its images.
        exclude: the ``--exclude`` patterns of this run, which int8 calibration leaves out like
            the update does; None: the existing index's (none for a new index).
    """
    requested = device
    chosen, device = choose_backend("onnx" if quantize and backend == "auto" else backend, device)
    if root is not None and not Path(root).is_dir():
        return model  # the index says what is wrong, before any model is loaded
    if chosen == "torch" and quantize is None:
        if isinstance(model, (str, os.PathLike)):
            # Loaded here, as the index would have loaded it: the index resolves no name.
            return load_model(model, requested)
        if model is not None:
            return model
        # None: the index's own model, deferred below like onnx's (or the default model).
    if isinstance(model, DeferredModel):
        return model
    if model is None:
        try:
            found = find_index_dir(index_dir if index_dir is not None else root)
        except MoCoRetrievalError:
            if root is None:
                return None  # nothing to search: the index says so
            model = sources.DEFAULT_MODEL  # a new index (looked up now: tests patch it)
        else:
            if quantize is None:
                # The index's own model, loaded only if there is work, from the source the index
                # reads in its manifest (read once, there; an unsaved one: the index says so).
                if chosen == "torch":  # as load_model: an .onnx source still loads
                    return DeferredModel(lambda source: load_model(source, requested))
                return DeferredModel(
                    lambda source: load_backend(
                        source, backend, device, cache_dir=cache_dir, notify=notify
                    )
                )
            model = read_manifest(found)["encoder"]["source"]  # int8: calibrated now
            if model is None:
                return None  # built with an unsaved encoder: the index says what to do
    calibration, calibrated_on = None, None
    if quantize is not None and root is not None:
        calibration, calibrated_on = _calibration(Path(root), index_dir, exclude)
    if not isinstance(model, (str, os.PathLike, MoCoEncoder, OnnxEncoder)):
        return model  # another embedder (a stand-in, a baseline): used as it is
    return load_backend(
        model,
        backend,
        device,
        cache_dir=cache_dir,
        quantize=quantize,
        calibration_images=calibration,
        notify=notify,
        calibrated_on=calibrated_on,
    )


def _calibration(
    root: Path, index_dir: str | Path | None, exclude: Sequence[str] | None
) -> tuple[list[Path], str]:
    """``(images, what they stand for)`` to calibrate int8 on: the images of ``root`` that the
    update will index, i.e. what the ignore rules leave (the defaults, ``.mocoretrievalignore``
    files, and ``exclude``, or the existing index's ``--exclude`` patterns when None)."""
    from .walk import walk_images

    if exclude is None:
        try:
            manifest = read_manifest(find_index_dir(index_dir if index_dir is not None else root))
        except MoCoRetrievalError:
            manifest = {}  # a new index: no patterns yet (an unreadable one: the index says so)
        exclude = manifest.get("exclude", [])
    patterns = list(exclude)
    # The index folder is never walked (hidden, the default one, is excluded anyway).
    skip = [Path(index_dir)] if index_dir is not None else []
    images = [root / p for p in walk_images(root, exclude=skip, patterns=patterns)]
    # Calibrated on this folder's images: another folder, or other patterns, get their own int8
    # model (no patterns: the key int8 models cached before patterns existed have).
    calibrated_on = str(root.resolve())
    if patterns:
        calibrated_on += "\0exclude=" + "\0".join(patterns)
    return images, calibrated_on


def open_index(
    index: str | Path | None = None,
    *,
    root: str | Path | Sequence[str | Path] | None = None,
    model: ModelArg = None,
    backend: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    cache_dir: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
    index_type: str | None = None,
    rebuild: bool = False,
    store_dtype: str | None = None,
    exclude: Sequence[str] | None = None,
) -> ImageIndex:
    """Opens an index with a model and backend: the one way the CLI and the app open one.

    Without ``root``, opens the existing index at ``index`` for searching (see
    :meth:`ImageIndex.open`). With ``root``, creates the index of that folder, or reuses the
    one there (see :meth:`ImageIndex.create`); call ``update()`` on it to embed what changed.
    The index's own model, when none is given, is loaded only once there is work for it.

    Args:
        index: the index directory, or an indexed folder; None: ``root/.mocoretrieval`` with a
            ``root``, else found in the current folder or its parents.
        root: the image folder to index, or several (a library; see
            :mod:`mocoretrieval.roots`), the first of which int8 is calibrated on.
        model: a model source (alias, directory, Hub id, checkpoint, ``.onnx`` file) or an
            embedder; None: the index's own model (the default model for a new index).
        backend, device, quantize, cache_dir, notify: see :func:`load_backend`; ``quantize``
            (int8) is calibrated on a sample of ``root``.
        index_type, rebuild, store_dtype: see :meth:`ImageIndex.create` (with ``root`` only).
        exclude: the ``--exclude`` patterns the coming update will use (None: the index's),
            which int8 calibration honours; the update itself takes its own ``exclude``.

    Raises:
        MoCoRetrievalError: no index there, a model other than the index's, a bad backend...
    """
    if root is None and (
        quantize is not None or index_type is not None or rebuild or store_dtype is not None
    ):
        raise MoCoRetrievalError(
            "quantize, index_type, rebuild and store_dtype apply when indexing a root"
        )
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root or [])
    first = Path(roots[0]).expanduser() if roots else None
    index = Path(index).expanduser() if index is not None else None
    embedder = index_model(
        model,
        backend,
        device,
        index_dir=index,
        root=first,
        quantize=quantize,
        cache_dir=cache_dir,
        notify=notify,
        exclude=exclude,
    )
    if root is None:
        return ImageIndex.open(index, model=embedder, device=device)
    return ImageIndex.create(
        [Path(r).expanduser() for r in roots],
        embedder,
        index,
        index_type=index_type,
        rebuild=rebuild,
        device=device,
        store_dtype=store_dtype,
    )
