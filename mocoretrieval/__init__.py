"""mocoretrieval: image search with self-supervised MoCo encoders."""

from __future__ import annotations

from .data import IMAGE_EXTENSIONS, load_image, walk_images
from .embed import EmbeddedBatch, iter_embeddings
from .encoder import MoCoEncoder
from .errors import (
    BackendError,
    CheckpointError,
    DatasetError,
    ImageError,
    IndexFormatError,
    MoCoRetrievalError,
    ModelMismatchError,
    SourceError,
    UnsafeCheckpointError,
)
from .onnx_backend import OnnxEncoder, load_backend
from .onnx_export import export_onnx
from .preprocess import Preprocess
from .sources import DEFAULT_MODEL, OFFICIAL, convert

__version__ = "0.1.0"

# Imported on first use, so that `import mocoretrieval` (and the training package) work
# without faiss installed.
_LAZY = {"ImageIndex": ".index", "SearchResult": ".index", "UpdateReport": ".index"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "OFFICIAL",
    "BackendError",
    "CheckpointError",
    "DatasetError",
    "EmbeddedBatch",
    "ImageError",
    "ImageIndex",
    "IndexFormatError",
    "MoCoEncoder",
    "MoCoRetrievalError",
    "ModelMismatchError",
    "OnnxEncoder",
    "Preprocess",
    "SearchResult",
    "SourceError",
    "UnsafeCheckpointError",
    "UpdateReport",
    "convert",
    "export_onnx",
    "iter_embeddings",
    "load_backend",
    "load_image",
    "walk_images",
]
