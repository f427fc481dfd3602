"""mocoretrieval: image search with self-supervised MoCo encoders."""

from __future__ import annotations

from .data import IMAGE_EXTENSIONS, load_image, walk_images
from .embed import EmbeddedBatch, iter_embeddings
from .encoder import MoCoEncoder
from .errors import (
    CheckpointError,
    ImageError,
    IndexFormatError,
    ModelMismatchError,
    MoCoRetrievalError,
    SourceError,
    UnsafeCheckpointError,
)
from .sources import DEFAULT_MODEL, OFFICIAL, convert

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "OFFICIAL",
    "CheckpointError",
    "EmbeddedBatch",
    "ImageError",
    "IndexFormatError",
    "ModelMismatchError",
    "MoCoEncoder",
    "MoCoRetrievalError",
    "SourceError",
    "UnsafeCheckpointError",
    "convert",
    "iter_embeddings",
    "load_image",
    "walk_images",
]
