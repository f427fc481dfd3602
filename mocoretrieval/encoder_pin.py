"""The encoder an index is pinned to: given, deferred, or loaded from its recorded source.

`ImageIndex` takes these methods from :class:`EncoderPin`. Whatever it is given, the weights
hash must be the pinned one; a model named by string is loaded through the loader that
:mod:`mocoretrieval.models` registers (this module, like index.py, resolves no model itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from .embedder import DeferredModel, Embedder
from .errors import MoCoRetrievalError, ModelMismatchError

# What the index is given as its model: an embedder, one to load only when there is work, a
# model source to load (through the loader `mocoretrieval.models` registers), or None (its own).
Model = Embedder | DeferredModel | str | os.PathLike | None


class EncoderPin:
    """The model half of `ImageIndex`: which encoder embeds for it, loaded when first needed."""

    # Set by ImageIndex.__init__.
    path: Path
    manifest: dict[str, Any]
    _encoder: Embedder | None
    _deferred: DeferredModel | None
    _device: str | None

    # How a model given by name is loaded: `mocoretrieval.models` registers its `load_model`
    # here when imported (the package's __init__ imports it). This module resolves no model
    # itself and never imports models.py: the dependency goes one way, models -> index.
    _load_model: ClassVar[Callable[[str | os.PathLike, str | None], Embedder] | None] = None

    @staticmethod
    def _encoder_entry(encoder: Embedder, source: str | None) -> dict[str, Any]:
        return {
            "source": source,
            "weights_hash": encoder.weights_hash(),
            "config": encoder.config.to_dict(),
            "dim": int(encoder.dim),
        }

    @property
    def encoder(self) -> Embedder:
        """The index's encoder, loaded from its recorded source on first use."""
        if self._encoder is None and self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._use_encoder(
                deferred.load(self.recorded_source()),
                hint="the model changed since indexing; use --rebuild",
            )
        if self._encoder is None:
            self._use_encoder(
                self.recorded_source(),
                hint="the model at that source changed since indexing; re-index with --rebuild",
            )
        return self._encoder

    def recorded_source(self) -> str:
        """The model source the manifest records, to load the index's own model from."""
        source = self.manifest["encoder"]["source"]
        if source is None:
            raise ModelMismatchError(
                f"the index at {self.path} was built with an encoder that was never saved; "
                "pass it with ImageIndex.open(path, model=encoder)"
            )
        return source

    @classmethod
    def _load_with(
        cls, model: Model, device: str | None, recorded: str | None = None
    ) -> tuple[Embedder, str | None]:
        """``(embedder, source)`` of an embedder, a source string, or a DeferredModel (loaded
        from ``recorded``, the index's recorded source); the source is what the manifest
        records, to load the model again from."""
        if isinstance(model, DeferredModel):
            if recorded is None:
                raise MoCoRetrievalError(
                    "the index's own model was asked for, but there is no index here yet: pass "
                    "a model (--model)"
                )
            model = model.load(recorded)
        if isinstance(model, (str, os.PathLike)):
            if cls._load_model is None:
                raise MoCoRetrievalError(
                    "no model loader is registered: import mocoretrieval (whose __init__ imports "
                    "mocoretrieval.models), or pass an encoder"
                )
            model = cls._load_model(model, device)
        source = getattr(model, "loaded_from", None) or model.config.source
        return model, source

    def _use_encoder(self, model: Model, hint: str) -> None:
        if isinstance(model, DeferredModel) and self._encoder is None:
            self._deferred = model  # checked when loaded, if ever
            return
        recorded = self.recorded_source() if isinstance(model, DeferredModel) else None
        encoder, source = self._load_with(model, self._device, recorded)
        pinned = self.manifest["encoder"]
        if encoder.weights_hash() != pinned["weights_hash"]:
            raise ModelMismatchError(
                f"the index at {self.path} was built with {pinned['source']} (weights "
                f"{pinned['weights_hash'][:12]}), not with {source} (weights "
                f"{encoder.weights_hash()[:12]}): {hint}"
            )
        self._encoder = encoder
