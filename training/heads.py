"""The trained networks: a `MoCoEncoder` as base encoder (backbone + projector) and a predictor.

Building the base encoder as the very class that is exported makes export a state-dict copy:
the backbone's keys are ``backbone.net.*`` and the projector's ``head.*``, as
:meth:`MoCoEncoder.from_pretrained` loads them strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mocoretrieval.backbones import feature_dim
from mocoretrieval.encoder import IMAGENET_MEAN, IMAGENET_STD, MoCoEncoder
from mocoretrieval.heads import build_mlp

from .config import PretrainConfig


def eval_resize(input_size: int, small_stem: bool) -> int:
    """Short side before the centre crop at evaluation: 256/224 of the crop, or the crop itself
    for small images, which are seen whole (as in the MoCo CIFAR demo)."""
    return input_size if small_stem else round(input_size * 256 / 224)


def build_base_encoder(
    cfg: PretrainConfig,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    source: str | None = None,
) -> MoCoEncoder:
    """A randomly initialised `MoCoEncoder` with the projection head of ``cfg``."""
    encoder = MoCoEncoder(
        arch=cfg.arch,
        moco_version=cfg.version,
        embedding="backbone",
        head=cfg.head_config(feature_dim(cfg.arch)),
        input_size=cfg.input_size,
        resize_size=eval_resize(cfg.input_size, cfg.small_stem),
        mean=tuple(mean or cfg.mean or IMAGENET_MEAN),
        std=tuple(std or cfg.std or IMAGENET_STD),
        small_stem=cfg.small_stem,
        source=source,
    )
    if cfg.zero_init_residual and encoder.is_resnet:
        # torchvision's zero_init_residual=True, used by MoCo v3 for ResNets: each residual
        # block starts as the identity.
        for m in encoder.backbone.modules():
            last_bn = getattr(m, "bn3", None) or getattr(m, "bn2", None)
            if last_bn is not None and hasattr(m, "downsample"):
                nn.init.zeros_(last_bn.weight)
    if cfg.stop_grad_conv1 and encoder.is_vit:
        # MoCo v3 Sec. 5: a frozen random patch projection stabilises ViT training.
        encoder.backbone.net.patch_embed.proj.requires_grad_(False)
    encoder.train()
    return encoder


def build_predictor(cfg: PretrainConfig) -> nn.Module | None:
    """MoCo v3's predictor (``moco/builder.py``): ``dim -> mlp_dim -> dim`` with BN, no bias.

    The ResNet predictor ends without BN, the ViT one with a non-affine BN (``last_bn``).
    """
    if cfg.pred_layers < 1:
        return None
    return build_mlp(
        cfg.pred_layers,
        in_dim=cfg.dim,
        hidden_dim=cfg.mlp_dim or feature_dim(cfg.arch),
        out_dim=cfg.dim,
        batch_norm=True,
        last_bn=cfg.pred_last_bn,
        bias=False,
    )
