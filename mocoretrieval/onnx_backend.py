"""The onnxruntime backend: `OnnxEncoder`, the export cache, and the torch/onnx choice."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .embed import available_cpus
from .embedder import FIELDS, EncoderConfig, EncoderConfigMixin
from .encoder import MoCoEncoder
from .errors import BackendError, MoCoRetrievalError
from .onnx_export import (
    FORMAT_VERSION,
    _parse_metadata,
    _session,
    export_onnx,
    file_sha256,
    read_metadata,
    sidecar_path,
)
from .preprocess import Preprocess, check_preprocessing

__all__ = [
    "BACKENDS",
    "OnnxEncoder",
    "cached_onnx",
    "choose_backend",
    "default_cache_dir",
    "export_onnx",
    "load_backend",
    "read_metadata",
    "sidecar_path",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "auto")
QUANTIZATIONS = ("int8",)


def default_cache_dir() -> Path:
    """Where exported models are cached: ``$MOCORETRIEVAL_CACHE/onnx``, else ``~/.cache/...``."""
    root = os.environ.get("MOCORETRIEVAL_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mocoretrieval" / "onnx"


# --- the encoder ----------------------------------------------------------------------------


class OnnxEncoder(EncoderConfigMixin):
    """An exported encoder run by onnxruntime, with :class:`MoCoEncoder`'s embedding protocol.

    ``preprocess``, ``input_size``, ``dim``, ``config`` and ``weights_hash()`` are those of the
    source encoder, so an index built with either backend is searchable with the other.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx` (or quantized from one).
        threads: onnxruntime intra-op threads; default, every core this process may use.
        device: ``cpu``, or ``cuda`` when onnxruntime was built with the CUDA provider.
        config: replaces the file's encoder config, e.g. with the ``source`` the weights were
            just loaded from when a cached export (keyed by weights, not source) is reused.
    """

    backend = "onnx"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        device: str = "cpu",
        config: EncoderConfig | Mapping[str, Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"no ONNX model at {self.path}; write one with `export-onnx`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or available_cpus()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: the image decoders share these cores. Indexing
        # 40 4-MPix JPEGs with ResNet-50 on 2 cores: 1.4-1.5x the images/s and 0.75-0.9x the CPU.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "this onnxruntime has no CUDA provider; use --backend torch on a GPU "
                    "(or install onnxruntime-gpu)"
                )
            providers.insert(0, "CUDAExecutionProvider")
        self.session = _session(self.path, opts, providers)
        self.meta = _parse_metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        c = config if config is not None else self.meta["config"]
        where = f"the config in {self.path}"
        self._config = c if isinstance(c, EncoderConfig) else EncoderConfig.from_dict(c)
        c = self._config
        check_preprocessing(c.resize_size, c.input_size, c.mean, c.std, where=where)
        if "dim" in self.meta and int(self.meta["dim"]) != self.dim:
            raise BackendError(
                f"{self.path} outputs {self.meta['dim']}-d embeddings but its config describes "
                f"{self.dim}-d ones: export it again with `mocoretrieval export-onnx`"
            )
        self.loaded_from: str | None = None  # the model source it was exported from, if known
        self.input_name = self.meta.get("input_name", self.session.get_inputs()[0].name)
        self.quantize: str | None = self.meta.get("quantize")

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> OnnxEncoder:
        """Loads an exported model; preprocessing is rebuilt from the file's own metadata."""
        return cls(path, threads=threads)

    @property
    def config(self) -> EncoderConfig:
        return self._config

    def __getattr__(self, name: str) -> Any:
        # The config's fields read as attributes, as MoCoEncoder has them (``arch``,
        # ``input_size``, ``mean``...): one rule for every field, no forwarding list.
        config = self.__dict__.get("_config")
        if config is not None and name in FIELDS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def preprocess(self) -> Preprocess:
        """The evaluation transform of the exported config, the same class MoCoEncoder uses."""
        c = self._config
        return Preprocess(c.resize_size, c.input_size, c.mean, c.std)

    def weights_hash(self) -> str:
        """The source encoder's weights hash, so indexes pin the same model whatever the backend."""
        return str(self.meta["weights_hash"])

    def to(self, device: Any) -> OnnxEncoder:
        """No-op, for code written for torch modules; the device is chosen at construction."""
        return self

    def eval(self) -> OnnxEncoder:
        return self

    def embed(
        self, images: Sequence[Image.Image] | Image.Image | torch.Tensor | np.ndarray
    ) -> np.ndarray:
        """Embeds PIL images (any mode) or a preprocessed (N, 3, H, W) batch.

        Returns:
            float32 array of shape (N, D), each row L2-normalised.
        """
        if isinstance(images, torch.Tensor):
            batch = images.detach().to("cpu", torch.float32).numpy()
        elif isinstance(images, np.ndarray):
            batch = images.astype(np.float32, copy=False)
        else:
            if isinstance(images, Image.Image):
                images = [images]
            batch = self.preprocess.batch(images).numpy()
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
        # Normalised again outside the graph: int8 models round the in-graph normalisation.
        out = out.astype(np.float32, copy=False)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def __repr__(self) -> str:
        q = f", quantize={self.quantize!r}" if self.quantize else ""
        return f"OnnxEncoder({self.config.arch}, dim={self.dim}, path={str(self.path)!r}{q})"


# --- cache and backend choice ---------------------------------------------------------------


def cache_key(
    encoder: MoCoEncoder, quantize: str | None = None, calibrated_on: str | None = None
) -> str:
    """File stem of the cached export: the weights hash, plus a digest of what shapes the graph.

    A quantized model also names what it was calibrated on (``calibrated_on``, e.g. the image
    folder), since its activation ranges are those of these images.
    """
    config = encoder.config.to_dict()
    graph = {k: v for k, v in config.items() if k not in ("source", "paper", "extra")}
    graph["format_version"] = FORMAT_VERSION
    digest = hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()[:8]
    stem = f"{encoder.weights_hash()[:32]}-{digest}"
    if not quantize:
        return stem
    if calibrated_on:
        stem += "-" + hashlib.sha256(calibrated_on.encode()).hexdigest()[:8]
    return f"{stem}-{quantize}"


def cached_onnx(
    encoder: MoCoEncoder,
    cache_dir: str | Path | None = None,
    quantize: str | None = None,
    calibration_images: Iterable[str | Path | Image.Image] | None = None,
    notify: Callable[[str], None] | None = None,
    calibrated_on: str | None = None,
) -> Path:
    """The cached ONNX export of ``encoder``, exported (and quantized) on first use only.

    The file is named by :func:`cache_key`, so changed weights give a new file and an old one is
    never served for them; an int8 model calibrated on one folder (``calibrated_on``) is not
    served for another. ``notify`` is told, in a sentence, before a step of several seconds
    (the export, the int8 calibration) starts, so that a front end can say why it waits.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise BackendError(f"unknown quantization {quantize!r}; choose one of {QUANTIZATIONS}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{cache_key(encoder, quantize, calibrated_on)}.onnx"
    if _usable(path, encoder.weights_hash()):
        logger.info("using cached ONNX model %s", path)
        return path
    if quantize is None:
        if notify is not None:
            notify(f"exporting the model to ONNX once, for onnxruntime; cached in {path.parent}")
        return export_onnx(encoder, path)
    from .onnx_quantize import quantize_int8

    if calibration_images is None:
        raise BackendError(
            "int8 quantization is calibrated on your images, and no int8 model is cached for "
            "this encoder yet: run `mocoretrieval index ... --quantize int8` first"
        )
    fp32 = cached_onnx(encoder, cache_dir, notify=notify)
    if notify is not None:
        notify("quantizing the model to int8 once, calibrated on a sample of your images")
    return quantize_int8(fp32, path, calibration_images)


def _usable(path: Path, weights_hash: str) -> bool:
    """Whether the cached export at ``path`` is the one its exporter wrote for these weights:
    its sidecar names the weights, and the file's content has the hash the exporter recorded
    there (a file replaced or altered since, whatever its own metadata says, is exported again).
    """
    if not path.is_file():
        return False
    try:
        meta = json.loads(sidecar_path(path).read_text())
        if meta.get("weights_hash") != weights_hash:
            return False
        if meta.get("file_sha256") == file_sha256(path):
            return True
        logger.warning("cached model %s does not match its recorded hash; exporting again", path)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unusable cached model %s: %s", path, e)
    return False


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
    source: str | Path | MoCoEncoder | OnnxEncoder,
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
            or an ``.onnx`` file written by :func:`export_onnx`.
        backend: ``torch``, ``onnx`` or ``auto`` (see :func:`choose_backend`).
        device: ``cpu``, ``cuda``...; default, a GPU when there is one.
        cache_dir: where exports are cached; default :func:`default_cache_dir`.
        quantize: ``int8`` for a statically quantized onnxruntime model (implies onnx).
        calibration_images: images (paths or PIL) to calibrate int8 on, needed the first time.
        threads: onnxruntime intra-op threads; default, all cores.
        notify: told before a one-time export or quantization starts (see :func:`cached_onnx`).
        calibrated_on: what the int8 calibration images stand for (the folder): one cached
            int8 model per value.

    Returns:
        A :class:`MoCoEncoder` (torch) or an :class:`OnnxEncoder`; both have ``embed``,
        ``preprocess``, ``dim`` and ``weights_hash``.
    """
    if quantize is not None and backend == "torch":
        raise BackendError("--quantize int8 runs on onnxruntime; use --backend onnx or auto")
    backend, device = choose_backend("onnx" if quantize and backend == "auto" else backend, device)
    onnx_file = isinstance(source, (str, Path)) and str(source).endswith(".onnx")
    if isinstance(source, OnnxEncoder) or onnx_file:
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
        # Local paths made absolute, as the index records them: it must find them from anywhere.
        path = Path(source).expanduser()
        source = str(path.resolve()) if path.exists() else str(source)
        encoder = MoCoEncoder.from_pretrained(source, device="cpu" if backend == "onnx" else device)
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


def index_model(
    model: Any = None,
    backend: str = "auto",
    device: str | None = None,
    *,
    index_dir: str | Path | None = None,
    root: str | Path | None = None,
    quantize: str | None = None,
    cache_dir: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
) -> Any:
    """The ``model`` to give :class:`~mocoretrieval.index.ImageIndex` for the chosen backend.

    With torch, ``model`` unchanged: the index loads it (or its own) as always. With onnx, an
    :class:`OnnxEncoder` of ``model``, else of the source the existing index was built with,
    else of the default model. The index checks its weights hash like any encoder's.

    Args:
        model: a model source or encoder, or None for the index's own.
        backend, device, quantize, cache_dir, notify: see :func:`load_backend`.
        index_dir: the index directory, or an indexed folder; None looks in ``root`` (or the
            current folder and its parents when ``root`` is None too).
        root: the image folder being indexed; int8 is calibrated on a sample of its images.
    """
    from .layout import find_index_dir, read_manifest

    chosen, device = choose_backend("onnx" if quantize and backend == "auto" else backend, device)
    if chosen == "torch" and quantize is None:
        return model
    if root is not None and not Path(root).is_dir():
        return model  # the index says what is wrong, before any model is loaded
    if model is None:
        try:
            found = find_index_dir(index_dir if index_dir is not None else root)
        except MoCoRetrievalError:
            if root is None:
                return None  # nothing to search: the index says so
            from .sources import DEFAULT_MODEL

            model = DEFAULT_MODEL  # a new index
        else:
            model = read_manifest(found)["encoder"]["source"]
            if model is None:
                return None  # built with an unsaved encoder: the index says what to do
            if quantize is None:  # the index's own model: loaded only if there is work
                from .index import DeferredModel

                source = model
                return DeferredModel(
                    lambda: load_backend(
                        source, backend, device, cache_dir=cache_dir, notify=notify
                    )
                )
    calibration = None
    if quantize is not None and root is not None:
        from .data import walk_images

        # Hidden folders, the default index among them, are never walked.
        skip = [Path(index_dir)] if index_dir is not None else []
        calibration = [Path(root) / p for p in walk_images(root, exclude=skip)]
    return load_backend(
        model,
        backend,
        device,
        cache_dir=cache_dir,
        quantize=quantize,
        calibration_images=calibration,
        notify=notify,
        # Calibrated on this folder's images: another folder gets its own int8 model.
        calibrated_on=str(Path(root).resolve()) if quantize is not None and root else None,
    )
