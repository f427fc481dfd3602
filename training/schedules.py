"""Learning-rate and momentum schedules: pure functions of (fractional) epoch -> float."""

from __future__ import annotations

import math
from collections.abc import Sequence


def step_lr(
    base_lr: float, epoch: float, epochs: int, steps: Sequence[float], gamma: float = 0.1
) -> float:
    """MoCo v1: ``base_lr`` times ``gamma`` for every milestone (fraction of ``epochs``) passed."""
    passed = sum(1 for s in steps if epoch >= s * epochs)
    return base_lr * gamma**passed


def cosine_lr(base_lr: float, epoch: float, epochs: int, warmup_epochs: float = 0.0) -> float:
    """Linear warmup then half-cycle cosine to 0 (MoCo v2 without, v3 with warmup)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_momentum(base_m: float, epoch: float, epochs: int) -> float:
    """MoCo v3: the momentum rises from ``base_m`` to 1 on a half-cycle cosine."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_m)


def learning_rate(cfg, epoch: float) -> float:
    """The lr of config ``cfg`` at ``epoch`` (fractional in v3), for the run's total batch size."""
    base = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017), all papers
    if not cfg.schedule_per_step:
        epoch = math.floor(epoch)  # v1/v2 official code sets the lr once per epoch
    if cfg.lr_schedule == "step":
        return step_lr(base, epoch, cfg.epochs, cfg.lr_steps)
    return cosine_lr(base, epoch, cfg.epochs, cfg.warmup_epochs)


def momentum(cfg, epoch: float) -> float:
    """The momentum-encoder coefficient of config ``cfg`` at (fractional) ``epoch``."""
    return cosine_momentum(cfg.m, epoch, cfg.epochs) if cfg.m_cos else cfg.m
