"""Domain errors: every message says what went wrong and what to do about it."""

from __future__ import annotations


class MoCoRetrievalError(Exception):
    """Base class of every error mocoretrieval raises on purpose; the CLI catches this one."""


class SourceError(MoCoRetrievalError):
    """A model source could not be recognised, found or fetched."""


class CheckpointError(MoCoRetrievalError):
    """A checkpoint's content does not match what the encoder expects."""


class ConfigError(CheckpointError, ValueError):
    """A model config (config.json, ONNX metadata) holds a value no encoder can use."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would run code when unpickled; it was refused, not run."""


class ModelMismatchError(MoCoRetrievalError):
    """An index was built with another encoder than the one it is used with."""


class IndexFormatError(MoCoRetrievalError):
    """An index directory is missing, corrupted or of an unsupported format."""


class DatasetError(MoCoRetrievalError):
    """A dataset (IDX files, a labeled or unlabeled image folder) is missing, empty or unusable."""


class IgnoreRuleError(MoCoRetrievalError):
    """An ignore pattern (``--exclude``, a ``.mocoretrievalignore`` line) cannot be read."""


class IndexChangedError(IndexFormatError):
    """A writer changed the index (e.g. re-embedded it with another model) during a read."""


class IndexBusyError(MoCoRetrievalError):
    """Another process is updating the index."""


class DiskFullError(MoCoRetrievalError):
    """A write failed for lack of space; what was committed before it is kept."""


class BackendError(MoCoRetrievalError):
    """An inference backend (torch, onnxruntime) or an exported model cannot be used as asked."""


class ImageError(MoCoRetrievalError):
    """An image could not be read or decoded.

    Attributes:
        reason: a short human reason ("truncated", "not an image", ...), fit for a skip list.
        path: the file, when known.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(f"cannot read image {path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path

    def __reduce__(self):  # keeps reason and path across processes (DataLoader workers)
        return type(self), (self.reason, self.path)
