"""What every embedder is: its `EncoderConfig` and the `Embedder` protocol the index embeds with.

`MoCoEncoder` (torch) and `OnnxEncoder` (onnxruntime) both satisfy :class:`Embedder`; the
index, `embed.iter_embeddings` and the evaluation take any object that does. An encoder's
config is written in one shape everywhere: config.json, an ONNX export's metadata and an
index manifest's ``encoder`` entry all hold :meth:`EncoderConfig.to_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .backbones import RESNETS, VITS, feature_dim
from .errors import ConfigError

if TYPE_CHECKING:
    from .preprocess import Preprocess

# The ImageNet statistics every official MoCo release normalises with (torchvision's values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def embedding_dim(config: Mapping[str, Any]) -> int:
    """Dimension of the embeddings of the encoder ``config`` (as in config.json) describes."""
    if config.get("embedding", "backbone") == "projection":
        return int(config["head"]["out_dim"])
    return feature_dim(config["arch"])


@dataclass(frozen=True, eq=False)
class EncoderConfig(Mapping[str, Any]):
    """The config.json fields of an encoder: what builds it and how images are prepared for it.

    The defaults are `MoCoEncoder`'s (MoCo v3's ResNet-50 at 224 px). Values are kept as given
    (`check_preprocessing` names a bad one with its fix), except that ``mean`` and ``std``
    become tuples. It reads as the JSON object it is written as (a read-only mapping of
    :meth:`to_dict`), so ``config["arch"]`` and ``config == json.load(f)`` hold too.
    """

    arch: str = "resnet50"
    moco_version: str = "v3"
    embedding: str = "backbone"  # "backbone" (pooled features) or "projection" (the head's)
    head: dict[str, Any] | None = None  # build_mlp keyword arguments, or None for no head
    input_size: int = 224  # side of the square crop the model sees
    resize_size: int = 256  # the short side is resized to this before the centre crop
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    small_stem: bool = False  # ResNet stem for inputs of 64 px or less
    source: str | None = None  # provenance: Hub id, URL, path or training run
    paper: str | None = None  # the paper of the recipe; MoCoEncoder fills in moco_version's
    extra: dict[str, Any] = field(default_factory=dict)  # free JSON-able metadata

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderConfig:
        """The config of a config.json object, an ONNX export's or a manifest's ``config``.

        Raises:
            ConfigError: a field this version does not know (a newer mocoretrieval wrote it).
        """
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise ConfigError(
                f"config.json has unknown fields {sorted(unknown)}; it was written by a newer "
                "mocoretrieval: upgrade with `pip install -U mocoretrieval`"
            )
        return cls(**{k: v for k, v in data.items() if not (k == "extra" and v is None)})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to config.json, ONNX metadata and index manifests."""
        return {name: _jsonable(getattr(self, name)) for name in FIELDS}

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)

    # --- what follows from it --------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Dimension of the embeddings the encoder returns."""
        return embedding_dim(self)

    @property
    def is_resnet(self) -> bool:
        return self.arch in RESNETS

    @property
    def is_vit(self) -> bool:
        return self.arch in VITS

    # --- read as its JSON object ----------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key not in FIELDS:
            raise KeyError(key)
        return _jsonable(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)

    def __repr__(self) -> str:
        return f"EncoderConfig({self.to_dict()!r})"


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EncoderConfig))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


class EncoderConfigMixin:
    """``is_resnet``, ``is_vit`` and ``dim`` read from ``config``: one definition for every
    backend (`MoCoEncoder`, `OnnxEncoder`)."""

    config: EncoderConfig

    @property
    def is_resnet(self) -> bool:
        return self.config.is_resnet

    @property
    def is_vit(self) -> bool:
        return self.config.is_vit

    @property
    def dim(self) -> int:
        """Dimension of the embeddings ``embed`` returns."""
        return self.config.dim


@runtime_checkable
class Embedder(Protocol):
    """What everything that embeds needs of a model (the index, `embed.iter_embeddings`, the
    evaluation). An index pins ``weights_hash()``: two embedders with the same hash (the torch
    model and its ONNX export) search each other's indexes."""

    @property
    def config(self) -> EncoderConfig: ...

    @property
    def preprocess(self) -> Preprocess:
        """The evaluation transform: resize, centre crop, normalise (from ``config``)."""
        ...

    @property
    def resize_size(self) -> int:
        """Short side images are resized to; decoders may shrink large images down to it."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def is_resnet(self) -> bool:
        """A convolutional model: torch runs it channels-last."""
        ...

    def embed(self, images: Any) -> np.ndarray:
        """PIL images or a preprocessed (N, 3, H, W) batch -> (N, D) float32, L2-normalised."""
        ...

    def weights_hash(self) -> str: ...


class DeferredModel:
    """An index's own model, loaded only when there is work for it: files to embed or an image
    query.

    An unchanged folder then costs no model loading at all. The index hands ``load`` the source
    its manifest records (read once, when the index is opened), and checks the loaded weights
    against its pin like any model's.

    Args:
        load: the embedder of a recorded source (e.g. an onnxruntime backend of it).
    """

    def __init__(self, load: Callable[[str], Embedder]) -> None:
        self.load = load
