"""Domain errors: every message says what went wrong and what to do about it."""

from __future__ import annotations


class MoCoRetrievalError(Exception):
    """Base class of every error mocoretrieval raises on purpose; the CLI catches this one."""


class SourceError(MoCoRetrievalError):
    """A model source could not be recognised, found or fetched."""


class CheckpointError(MoCoRetrievalError):
    """A checkpoint's content does not match what the encoder expects."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would run code when unpickled; it was refused, not run."""


class ModelMismatchError(MoCoRetrievalError):
    """An index was built with another encoder than the one it is used with."""


class IndexFormatError(MoCoRetrievalError):
    """An index directory is missing, corrupted or of an unsupported format."""


class ImageError(MoCoRetrievalError):
    """An image could not be read or decoded."""
