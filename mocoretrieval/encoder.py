"""`MoCoEncoder`: a backbone plus an optional projection head, its config and `embed`; no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from PIL import Image
from torch import nn

from .backbones import build_backbone, feature_dim
from .embedder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderConfig,
    EncoderConfigMixin,
)
from .errors import ConfigError
from .heads import build_mlp
from .preprocess import Preprocess, check_preprocessing

PAPERS = {
    "v1": "He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020",
    "v2": "Chen et al., Improved Baselines with Momentum Contrastive Learning, arXiv:2003.04297",
    "v3": "Chen, Xie, He, An Empirical Study of Training Self-Supervised Vision Transformers, "
    "ICCV 2021",
}


class MoCoEncoder(
    nn.Module,
    PyTorchModelHubMixin,
    EncoderConfigMixin,
    library_name="mocoretrieval",
    tags=["moco", "self-supervised", "image-feature-extraction"],
):
    """A MoCo image encoder: backbone, optional projection head, and its preprocessing config.

    Every constructor argument is JSON-able so that ``save_pretrained`` writes it to config.json.

    Args:
        arch: ``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``, ``vit_small`` or
            ``vit_base``.
        moco_version: ``v1``, ``v2`` or ``v3``: which recipe trained the weights.
        embedding: ``backbone`` (pooled features, the usual choice for retrieval) or
            ``projection`` (the contrastive head's output).
        head: the projection head as :func:`~mocoretrieval.heads.build_mlp` keyword arguments
            (``num_layers``, ``hidden_dim``, ``out_dim``, ``batch_norm``, ``last_bn``, ``bias``),
            or None for none.
        input_size: side of the square crop the model sees.
        resize_size: the short side is resized to this before the centre crop.
        mean, std: normalisation of the RGB input in [0, 1].
        small_stem: ResNet stem for inputs of 64 px or less (3x3 conv, no max-pool).
        source: where the weights came from (Hub id, URL, path, or a training run).
        paper: the paper of the recipe; defaults to the one of ``moco_version``.
        extra: free JSON-able metadata (training config, measured accuracy, ...).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        moco_version: str = "v3",
        embedding: str = "backbone",
        head: dict[str, Any] | None = None,
        input_size: int = 224,
        resize_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        small_stem: bool = False,
        source: str | None = None,
        paper: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if moco_version not in PAPERS:
            raise ValueError(f"moco_version must be one of v1, v2, v3, got {moco_version!r}")
        if embedding not in ("backbone", "projection"):
            raise ValueError(f"embedding must be 'backbone' or 'projection', got {embedding!r}")
        if embedding == "projection" and head is None:
            raise ValueError("embedding='projection' needs a projection head; pass head=...")
        check_preprocessing(resize_size, input_size, mean, std)  # before any tensor is made
        if resize_size < input_size:
            raise ConfigError(f"resize_size ({resize_size}) must be >= input_size ({input_size})")
        self.arch = arch
        self.moco_version = moco_version
        self.embedding = embedding
        self.head_config = dict(head) if head is not None else None
        self.input_size = input_size
        self.resize_size = resize_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.small_stem = small_stem
        self.source = source
        self.paper = paper or PAPERS[moco_version]
        self.extra = dict(extra or {})
        # Where from_pretrained found this encoder (absolute path, Hub id or alias), so that an
        # index can load it again; ``source`` is provenance and may not be loadable.
        self.loaded_from: str | None = None

        self.backbone = build_backbone(arch, img_size=input_size, small_stem=small_stem)
        self.head = None
        if head is not None:
            self.head = build_mlp(in_dim=feature_dim(arch), **head)
        self.eval()

    @property
    def config(self) -> EncoderConfig:
        """The constructor arguments, as written to config.json (``config.to_dict()``)."""
        return EncoderConfig(
            arch=self.arch,
            moco_version=self.moco_version,
            embedding=self.embedding,
            head=self.head_config,
            input_size=self.input_size,
            resize_size=self.resize_size,
            mean=self.mean,
            std=self.std,
            small_stem=self.small_stem,
            source=self.source,
            paper=self.paper,
            extra=self.extra,
        )

    @property
    def preprocess(self) -> Preprocess:
        """The evaluation transform: resize short side, centre crop, to tensor, normalise."""
        return Preprocess(self.resize_size, self.input_size, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) embeddings, not yet L2-normalised."""
        feats = self.backbone(x)  # (N, C)
        if self.embedding == "projection":
            return self.head(feats)  # (N, D)
        return feats

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image] | torch.Tensor) -> np.ndarray:
        """Embeds PIL images (any mode) or a preprocessed (N, 3, H, W) batch.

        Returns:
            float32 array of shape (N, D), each row L2-normalised.
        """
        if isinstance(images, torch.Tensor):
            batch = images
        else:
            if isinstance(images, Image.Image):
                images = [images]
            batch = self.preprocess.batch(images)
        param = next(self.parameters())
        batch = batch.to(device=param.device, dtype=param.dtype)
        if self.training:
            self.eval()
        out = nn.functional.normalize(self(batch).float(), dim=1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def weights_hash(self) -> str:
        """SHA-256 of every tensor (names, shapes, values): pins an index to these weights."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    # --- saving and loading: the Hub mixin's hooks, the I/O in hub.py -------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: ``save_pretrained`` (and ``push_to_hub``) write config.json,
        model.safetensors and a README.md model card through :func:`mocoretrieval.hub.save`."""
        from .hub import save

        save(self, self.config, save_directory)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The mixin's model-card hook: the card ``save_pretrained`` writes as README.md."""
        from .hub import model_card

        return ModelCard(model_card(self.config))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MoCoEncoder:
        """The encoder a config.json object (or an :class:`EncoderConfig`) describes.

        Raises:
            ConfigError: a field this version does not know, or a value it cannot use.
        """
        fields = EncoderConfig.from_dict(config)
        return cls(**{name: getattr(fields, name) for name in fields})

    # How `from_pretrained` resolves a source: `mocoretrieval.sources.load`, which registers
    # itself when imported (the package's __init__ imports it, so it always has). This file, like
    # timm's model files, holds the architecture and no Hub or file resolution, and never
    # imports sources.py: the dependency goes one way, sources -> encoder (-> hub, lazily).
    # `from_pretrained` is overridden rather than the mixin's `_from_pretrained` hook: the
    # mixin's `from_pretrained` first fetches config.json from a folder or the Hub, which an
    # alias or an official `.pth.tar` does not have (and, offline, fails before any hook runs).
    _load_source: ClassVar[Callable[..., MoCoEncoder] | None] = None

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: Any) -> MoCoEncoder:  # type: ignore[override]
        """Loads an encoder from any accepted source; see :func:`mocoretrieval.sources.load`.

        Accepted: a directory written by :meth:`save_pretrained`, a Hugging Face Hub repo id in
        that layout, an official facebookresearch MoCo checkpoint file (``.pth.tar``), or the
        alias of an officially released checkpoint (see ``mocoretrieval.sources.OFFICIAL``).
        Loading is strict: a missing or unexpected tensor raises.
        """
        if MoCoEncoder._load_source is None:
            raise RuntimeError(
                "no model-source loader is registered: import mocoretrieval (whose __init__ "
                "imports mocoretrieval.sources) before calling MoCoEncoder.from_pretrained"
            )
        return MoCoEncoder._load_source(source, **kwargs)
