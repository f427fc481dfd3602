"""The ONNX export cache: one file per (weights, graph), exported or quantized on first use.

A cached file proves its content, not only its label: its name is the weights hash plus a
digest of what shapes the graph, and its sidecar records the file's own SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from .encoder import MoCoEncoder
from .errors import BackendError
from .onnx_export import FORMAT_VERSION, export_onnx, file_sha256, sidecar_path

__all__ = ["QUANTIZATIONS", "cache_key", "cached_onnx", "default_cache_dir"]

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)


def default_cache_dir() -> Path:
    """Where exported models are cached: ``$MOCORETRIEVAL_CACHE/onnx``, else ``~/.cache/...``."""
    root = os.environ.get("MOCORETRIEVAL_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mocoretrieval" / "onnx"


# Config fields that do not shape the exported graph: exports of the same weights share a file.
KEY_IGNORES = ("source", "paper", "extra")


def cache_key(
    encoder: MoCoEncoder, quantize: str | None = None, calibrated_on: str | None = None
) -> str:
    """File stem of the cached export: the weights hash, plus a digest of what shapes the graph.

    A quantized model also names what it was calibrated on (``calibrated_on``, e.g. the image
    folder), since its activation ranges are those of these images.
    """
    config = encoder.config.to_dict()
    graph = {k: v for k, v in config.items() if k not in KEY_IGNORES}
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
