"""Pretraining hyperparameters: one dataclass, one preset per MoCo version, each default cited.

Sources, cited below by tag:
- [v1]   He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020,
         and facebookresearch/moco ``main_moco.py`` (defaults of the v1 run).
- [v2]   Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297,
         and facebookresearch/moco ``main_moco.py --mlp --moco-t 0.2 --aug-plus --cos``.
- [v3]   Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
         ICCV 2021, and facebookresearch/moco-v3 ``main_moco.py``, ``moco/builder.py``,
         ``CONFIG.md`` (ResNet-50 100-epoch and ViT-S/B recipes).
- [demo] the MoCo CIFAR-10 demo notebook of facebookresearch/moco (kNN monitor, split BN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mocoretrieval.backbones import ARCHS, VITS
from mocoretrieval.errors import MoCoRetrievalError

VERSIONS = ("v1", "v2", "v3")
# The standard ResNet stem and stages divide the input by 32: below this the last stage sees
# a 1x1 map under a stride-2 3x3 conv, degenerate (and miscomputed by oneDNN's bf16 kernels).
MIN_STANDARD_STEM_SIZE = 32


class ConfigError(MoCoRetrievalError, ValueError):
    """A pretraining configuration is inconsistent; the message names the field to change."""


@dataclass
class PretrainConfig:
    """Everything that decides what a pretraining run computes (not where it reads or writes)."""

    version: str = "v2"
    arch: str = "resnet50"
    # The 3x3-conv, no-max-pool ResNet stem of [demo] for small inputs: 16x the compute of the
    # standard stem at the same size, so preset() chooses it only below 32 px.
    small_stem: bool = False
    input_size: int = 224
    # Zero-init the last BN of each residual block: [v3] builds ResNets with zero_init_residual.
    zero_init_residual: bool = False

    # --- heads ---
    dim: int = 128  # output dim: 128 in [v1]/[v2], 256 in [v3]
    # Hidden width of the MLP heads. None: the backbone's feature dim, as [v2] (2048 for R50).
    mlp_dim: int | None = None
    # Layers of the projection head: 1 linear in [v1], 2 in [v2]; [v3] 2 (ResNet) / 3 (ViT).
    proj_layers: int = 2
    # [v3]'s heads have BN after every hidden Linear, no biases and a last BN without affine.
    head_bn: bool = False
    pred_layers: int = 0  # predictor: 0 = none ([v1]/[v2]); 2 in [v3]
    # [v3] builder: the ResNet predictor ends without BN (last_bn=False), the ViT one with BN.
    pred_last_bn: bool = False

    # --- contrast ---
    queue_size: int = 65536  # K=65536 [v1]; 0 = no queue, keys from the batch [v3]
    m: float = 0.999  # [v1]; [v3] starts at 0.99
    m_cos: bool = False  # [v3]: momentum rises to 1 on a half-cycle cosine
    T: float = 0.2  # 0.07 [v1], 0.2 [v2], 1.0 [v3] ResNet / 0.2 [v3] ViT
    # Shuffle-BN [v1 Sec. 3.3] over this many BN groups in total (8 GPUs in [v1]/[v2];
    # bn_splits=8 in [demo]); in one process the batch is split into that many sub-batches.
    shuffle_bn_groups: int = 8
    # [v3] trains with SyncBN across processes (full-batch statistics).
    sync_bn: bool = False
    # [v1]/[v2] with [demo]'s symmetric loss: each view is also the query of the other view's
    # key, and both views' keys are enqueued; twice the work of a step, more signal per image.
    # [v3]'s loss is always symmetric.
    symmetric: bool = False

    # --- optimisation ---
    epochs: int = 200  # [v1]/[v2]; [v3] 100 (R50) / 300 (ViT)
    batch_size: int = 256  # total over all processes; [v1]/[v2] 256, [v3] 4096
    optimizer: str = "sgd"  # sgd [v1]/[v2], lars [v3] ResNet, adamw [v3] ViT
    lr: float = 0.03  # base lr for batch 256, scaled by batch/256 ([v1]: 0.03; [v3] 0.6 / 1.5e-4)
    momentum: float = 0.9  # SGD / LARS momentum [v1][v3]
    weight_decay: float = 1e-4  # [v1]; [v3] 1e-6 (LARS) / 0.1 (AdamW)
    lr_schedule: str = "cosine"  # "step" [v1]: x0.1 at lr_steps; "cosine" [v2]/[v3]
    lr_steps: tuple[float, ...] = (0.6, 0.8)  # [v1]: epochs 120 and 160 of 200
    warmup_epochs: float = 0.0  # [v3]: 10 (R50) / 40 (ViT), linear
    # [v1]/[v2] set the lr once per epoch; [v3] per iteration (fractional epochs).
    schedule_per_step: bool = False
    stop_grad_conv1: bool = False  # [v3] ViT: patch projection frozen at its random init

    # --- augmentation (two views) ---
    # RandomResizedCrop scale (crop_min, 1): 0.2 in [v1][v2] and [v3]'s R50 recipes (CONFIG.md);
    # 0.08, the moco-v3 main_moco.py default, for ViTs.
    crop_min: float = 0.2
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # [v2]; [v1] hue 0.4
    jitter_p: float = 0.8  # [v2]; [v1] always (1.0)
    grayscale_p: float = 0.2  # [v1][v2][v3]
    # Blur sigma range in pixels of a 224-px image, scaled by input_size/224 so that small
    # inputs are not blurred out of existence; sigma in [0.1, 2] from [v2] (SimCLR).
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float] = (0.5, 0.5)  # per view: [v2] 0.5; [v3] 1.0 / 0.1 (BYOL)
    solarize_p: tuple[float, float] = (0.0, 0.0)  # per view: [v3] 0 / 0.2 (BYOL)
    flip_p: float = 0.5
    # Edits a copy of a photo goes through, for encoders meant to find copies (not in any MoCo
    # paper; the copy-detection recipe of SSCD, Pizzi et al. CVPR 2022, trains with them):
    # rotation by up to this many degrees, downscaling to a fraction of the crop's side and
    # back, JPEG re-encoding at a quality in a range. Image folders only (PIL pipeline).
    rotate_deg: float = 0.0
    downscale_p: float = 0.0
    downscale: tuple[float, float] = (0.3, 1.0)
    jpeg_p: float = 0.0
    jpeg_quality: tuple[int, int] = (25, 95)
    # Normalisation of the inputs; None: ImageNet statistics (or the dataset's own, if known).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    # --- monitoring and run ---
    knn_k: int = 200  # [demo]
    knn_t: float = 0.1  # [demo]
    knn_every: int = 1  # epochs between kNN evaluations (0: never)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError on an inconsistent combination, naming the field to change."""
        if self.version not in VERSIONS:
            raise ConfigError(f"version must be one of {VERSIONS}, got {self.version!r}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.optimizer not in ("sgd", "lars", "adamw"):
            raise ConfigError(f"optimizer must be sgd, lars or adamw, got {self.optimizer!r}")
        if self.lr_schedule not in ("step", "cosine"):
            raise ConfigError(f"lr_schedule must be step or cosine, got {self.lr_schedule!r}")
        if self.version == "v3" and self.queue_size:
            raise ConfigError("MoCo v3 has no queue: set queue_size=0")
        if self.version == "v3" and self.symmetric:
            raise ConfigError("MoCo v3's loss is always symmetric: leave symmetric unset")
        if self.version != "v3" and self.queue_size < 1:
            raise ConfigError(f"MoCo {self.version} needs a queue: set queue_size > 0")
        if self.version == "v3" and self.pred_layers < 1:
            raise ConfigError("MoCo v3 needs a predictor: set pred_layers >= 1")
        if not 0.0 <= self.m <= 1.0:
            raise ConfigError(f"momentum m must be in [0, 1], got {self.m}")
        if self.epochs < 1 or self.batch_size < 1 or self.shuffle_bn_groups < 1:
            raise ConfigError("epochs, batch_size and shuffle_bn_groups must be positive")
        if not (0 < self.downscale[0] <= self.downscale[1] <= 1):
            raise ConfigError(f"downscale must be a range within (0, 1], got {self.downscale}")
        if not (1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100):
            raise ConfigError(f"jpeg_quality must be within [1, 100], got {self.jpeg_quality}")
        if not self.is_vit:
            smallest = 8 if self.small_stem else MIN_STANDARD_STEM_SIZE
            if self.input_size < smallest:
                raise ConfigError(
                    f"input_size {self.input_size} is too small for the "
                    f"{'small' if self.small_stem else 'standard'} ResNet stem (at least "
                    f"{smallest} px); raise input_size"
                    + ("" if self.small_stem else " or pass small_stem (--small-stem)")
                )
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs")

    @property
    def is_vit(self) -> bool:
        return self.arch in VITS

    def head_config(self, feature_dim: int) -> dict[str, Any]:
        """The projection head as :func:`mocoretrieval.heads.build_mlp` keyword arguments."""
        hidden = self.mlp_dim or feature_dim
        if self.head_bn:  # [v3] builder._build_mlp: Linear(bias=False), BN, ReLU; last BN
            return {
                "num_layers": self.proj_layers,
                "hidden_dim": hidden,
                "out_dim": self.dim,
                "batch_norm": True,
                "last_bn": True,
                "bias": False,
            }
        return {"num_layers": self.proj_layers, "hidden_dim": hidden, "out_dim": self.dim}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


def preset(version: str, arch: str = "resnet50", **overrides: Any) -> PretrainConfig:
    """The published recipe of ``version`` for ``arch``, with ``overrides`` applied on top.

    ResNets keep the standard stem down to 32 px unless ``small_stem=True`` is given: on 32-px
    Fashion-MNIST the 3x3/1 stem costs 16x the compute per image (a ResNet-18 forward+backward
    ran at ~20-40 images/s on 2 CPU cores with it, ~900 without). Below 32 px the standard stem
    leaves the last stage nothing to convolve, so the small stem is chosen.
    """
    if version not in VERSIONS:
        raise ConfigError(f"version must be one of {VERSIONS}, got {version!r}")
    vit = arch in VITS
    if version == "v1":
        base: dict[str, Any] = {
            "dim": 128,
            "proj_layers": 1,
            "queue_size": 65536,
            "m": 0.999,
            "T": 0.07,
            "epochs": 200,
            "batch_size": 256,
            "optimizer": "sgd",
            "lr": 0.03,
            "weight_decay": 1e-4,
            "lr_schedule": "step",
            "jitter": (0.4, 0.4, 0.4, 0.4),
            "jitter_p": 1.0,
            "blur_p": (0.0, 0.0),
        }
    elif version == "v2":
        base = {
            "dim": 128,
            "proj_layers": 2,
            "queue_size": 65536,
            "m": 0.999,
            "T": 0.2,
            "epochs": 200,
            "batch_size": 256,
            "optimizer": "sgd",
            "lr": 0.03,
            "weight_decay": 1e-4,
            "lr_schedule": "cosine",
            "jitter": (0.4, 0.4, 0.4, 0.1),
            "jitter_p": 0.8,
            "blur_p": (0.5, 0.5),
        }
    else:
        base = {
            "dim": 256,
            "mlp_dim": 4096,
            "proj_layers": 3 if vit else 2,
            "head_bn": True,
            "pred_layers": 2,
            "pred_last_bn": vit,
            "queue_size": 0,
            "m": 0.99,
            "m_cos": True,
            "T": 0.2 if vit else 1.0,
            "shuffle_bn_groups": 1,
            "sync_bn": True,
            "zero_init_residual": not vit,
            "epochs": 300 if vit else 100,
            "batch_size": 4096,
            "optimizer": "adamw" if vit else "lars",
            "lr": 1.5e-4 if vit else 0.6,
            "weight_decay": 0.1 if vit else 1e-6,
            "lr_schedule": "cosine",
            "warmup_epochs": 40 if vit else 10,
            "schedule_per_step": True,
            "stop_grad_conv1": vit,
            "crop_min": 0.08 if vit else 0.2,
            "jitter": (0.4, 0.4, 0.2, 0.1),
            "jitter_p": 0.8,
            "blur_p": (1.0, 0.1),
            "solarize_p": (0.0, 0.2),
        }
    base.update(version=version, arch=arch)
    if not vit and "small_stem" not in overrides:
        base["small_stem"] = overrides.get("input_size", 224) < MIN_STANDARD_STEM_SIZE
    base.update(overrides)
    return PretrainConfig(**base)


# Named recipes for a data set and a machine: overrides of each version's preset, shared ones
# under "all", the version trained by default under "version". Each one's numbers were measured
# with the command in its comment (benchmarks/RESULTS.md).
# The contrast and optimiser settings of the CPU presets below: [demo]'s small-data settings
# (K=4096, m=0.99 and T=0.1 for short runs, wd 5e-4) and 2x [v1]'s base lr for 10x-shorter runs.
_SHORT_RUN: dict[str, Any] = {
    "queue_size": 4096,
    "m": 0.99,
    "T": 0.1,
    "lr": 0.06,
    "weight_decay": 5e-4,
}

NAMED: dict[str, dict[str, Any]] = {
    # Fashion-MNIST (60,000 images) on a 2-core CPU: `python -m training.pretrain --preset
    # fmnist-cpu --out-dir runs/fmnist-cpu` trains MoCo v2 in under 60 minutes (the learning
    # proof of benchmarks/RESULTS.md); `--version v1|v3 --epochs N` the others on a budget.
    # `--budget-min 60` instead plans the epochs into the hour on whatever host runs it (89 on
    # an AMX Xeon at ~1,560 images/s: 0.8654, encoder exported after 59.7 minutes).
    "fmnist-cpu": {
        "version": "v2",
        # A ResNet with the standard stem at 32 px (4-16x cheaper than the small stem with
        # plain convs, on AMX and AVX-512 CPUs), its 2x2 and 1x1 maps computed as matrix
        # products (backbones.Conv2d): a ResNet-18 trains v2 at ~500-900 images/s in bf16 on 2
        # cores (benchmarks/train_cpu.py, small_maps.py).
        "all": {"arch": "resnet18", "input_size": 32, "small_stem": False, "batch_size": 256},
        # The small-image settings of [demo] (K=4096 for a 60k data set, m=0.99 and T=0.1 for
        # short runs, wd 5e-4) and cosine lr at 2x [v1]'s base lr, as the run is 10x shorter
        # than [demo]'s. 28 epochs took 39.5 minutes, and 27 took 49.8, on this 2-core host as
        # its speed varied (66-189 s an epoch); the 28 ended at 0.8299 (random init 0.7756).
        # T=0.2 ([v2]'s own) and BN in the projection head (as SimCLR's, [v3]'s): 6-epoch probes
        # of the whole cosine schedule ended at 0.7742 (T=0.1, no head BN), 0.7879 (T=0.2) and
        # 0.8005 (both); lr 0.12 (0.7536) and crops down to 8% without blur (0.7760) did not help.
        # ResNet-10 (one block per stage): the 6-epoch probe reached 0.8085 / 0.8145 after
        # epochs 3 / 6 (ResNet-18: 0.7846 / 0.8005; random init 0.7810 against 0.7756) at
        # ~1.6x the images/s (RESULTS.md "fmnist-cpu probes: training crops below 32 px, and
        # ResNet-10"); `--budget-min 60`: 90 epochs, 0.8494 (ResNet-18: 48 epochs, 0.8439).
        # Base lr 0.03 won the 6-epoch probe (0.8196) but not the hour (95 epochs, 0.8478).
        # Crops of at least 40% of the image, not 20% ([v2]'s, for 224-px ImageNet photos: a
        # 20% crop of a 28-px image is ~12 px a side): 0.8222 in the 6-epoch probe (60%:
        # 0.8187), and the hour 0.8548 (113 epochs; ahead of 0.2's at every evaluation, +0.6
        # at epoch 88), RESULTS.md "fmnist-cpu probes, round 6".
        # Solarize at p=0.2 on both views ([v3]'s, from BYOL, on the second view only): a
        # garment's bright pixels inverted, so two views of it may differ in more than
        # brightness and contrast. 0.8364 in the 6-epoch probe against 0.8222 (second view only:
        # 0.8348; p=0.4 there: 0.8324), and the hour 0.8608 (90 epochs on a slower host; ahead
        # of the 40% crops' hour at every evaluation, by 0.3-1.6), RESULTS.md round 7.
        # With twice [v2]'s brightness and contrast range on every view (0.8249 in the 6-epoch
        # probe without solarize), the hour 0.8654 (89 epochs, +8.4 over random init; ahead of
        # solarize alone from epoch 24 on), RESULTS.md round 7. Gray images have no saturation
        # or hue to jitter.
        "v2": {
            **_SHORT_RUN,
            "arch": "resnet10",
            "T": 0.2,
            "head_bn": True,
            "crop_min": 0.4,
            "solarize_p": (0.2, 0.2),
            "jitter": (0.8, 0.8, 0.0, 0.0),
            "jitter_p": 1.0,
            "epochs": 28,
            "knn_every": 8,
        },
        # v1 keeps its own head, T=0.07 and step schedule; the queue and momentum of v2's row.
        "v1": {"queue_size": 4096, "m": 0.99, "weight_decay": 5e-4, "epochs": 6, "knn_every": 2},
        # v3 keeps LARS, its heads and the symmetric loss, with its 10%-of-the-run warmup.
        "v3": {"epochs": 4, "warmup_epochs": 0.4, "knn_every": 2},
    },
    # The shipped default encoder (mocoretrieval/weights/moco-v2-r18-photos): MoCo v2 on the
    # tiles of the photo corpus (`python -m training.photos tiles`, 5,550 tiles of 37
    # pictures), on a 2-core CPU: `python -m training.pretrain --preset photos-cpu --data
    # TILES --out-dir runs/photos`. ResNet-18 at 112 px: ~50 images/s of training in bf16.
    "photos-cpu": {
        "version": "v2",
        "all": {"arch": "resnet18", "input_size": 112, "batch_size": 64},
        # The short-run contrast settings of fmnist-cpu (K=4096 < the 5,550 tiles, so a tile's
        # key from the last epoch has left the queue), and the edits copies meet in the wild
        # added to v2's augmentations: rotation, downscaling, JPEG; grayscale at 0.4 (0.2 in
        # [v2]: a 10-epoch pilot found grayscale copies the weakest kind, 0.82 recall@1).
        "v2": {
            **_SHORT_RUN,
            "epochs": 30,
            "grayscale_p": 0.4,
            "rotate_deg": 8.0,
            "downscale_p": 0.3,
            "jpeg_p": 0.3,
        },
    },
}


def named_preset(name: str, version: str | None = None, **overrides: Any) -> PretrainConfig:
    """The named recipe ``name`` (see :data:`NAMED`) for ``version`` (default: the recipe's),
    with ``overrides`` on top."""
    if name not in NAMED:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(NAMED))}")
    recipe = NAMED[name]
    version = version or recipe["version"]
    if version not in recipe:
        raise ConfigError(f"preset {name!r} has no recipe for MoCo {version}")
    fields = {**recipe.get("all", {}), **recipe[version], **overrides}
    return preset(version, fields.pop("arch"), **fields)
