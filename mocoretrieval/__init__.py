"""mocoretrieval: image search with self-supervised MoCo encoders."""

from __future__ import annotations

from .data import load_image
from .embed import EmbeddedBatch, iter_embeddings
from .embedder import DeferredModel, Embedder, EncoderConfig
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
from .index import ImageIndex, SearchResult, UpdateReport
from .models import load_backend, load_model, open_index
from .onnx_backend import OnnxEncoder
from .onnx_export import export_onnx
from .preprocess import Preprocess
from .roots import Root, RootError, Roots
from .sources import DEFAULT_MODEL, OFFICIAL, convert
from .walk import IMAGE_EXTENSIONS, walk_images
from .watch import Watcher

# `import mocoretrieval` works without faiss installed (the training package needs none):
# `mocoretrieval.ann` imports it when an index is first built or searched.

__version__ = "0.1.0"


__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "OFFICIAL",
    "BackendError",
    "CheckpointError",
    "DatasetError",
    "DeferredModel",
    "EmbeddedBatch",
    "Embedder",
    "EncoderConfig",
    "ImageError",
    "ImageIndex",
    "IndexFormatError",
    "MoCoEncoder",
    "MoCoRetrievalError",
    "ModelMismatchError",
    "OnnxEncoder",
    "Preprocess",
    "Root",
    "RootError",
    "Roots",
    "SearchResult",
    "SourceError",
    "UnsafeCheckpointError",
    "UpdateReport",
    "Watcher",
    "convert",
    "export_onnx",
    "iter_embeddings",
    "load_backend",
    "load_image",
    "load_model",
    "open_index",
    "walk_images",
]
