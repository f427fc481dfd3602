"""Schedules (pure functions) and the LARS optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import ConfigError, preset
from training.optim import LARS, build_optimizer
from training.schedules import cosine_lr, cosine_momentum, learning_rate, momentum, step_lr


def test_step_lr_drops_tenfold_at_60_and_80_percent():
    assert step_lr(0.03, 119, 200, (0.6, 0.8)) == 0.03
    assert math.isclose(step_lr(0.03, 120, 200, (0.6, 0.8)), 0.003)
    assert math.isclose(step_lr(0.03, 160, 200, (0.6, 0.8)), 0.0003)


def test_cosine_lr_with_linear_warmup():
    assert cosine_lr(1.0, 0.0, 100, 10) == 0.0
    assert math.isclose(cosine_lr(1.0, 5.0, 100, 10), 0.5)
    assert math.isclose(cosine_lr(1.0, 10.0, 100, 10), 1.0)
    assert math.isclose(cosine_lr(1.0, 55.0, 100, 10), 0.5)
    assert cosine_lr(1.0, 100.0, 100, 10) < 1e-12


def test_cosine_momentum_rises_from_base_to_one():
    assert math.isclose(cosine_momentum(0.99, 0, 100), 0.99)
    assert math.isclose(cosine_momentum(0.99, 50, 100), 0.995)
    assert math.isclose(cosine_momentum(0.99, 100, 100), 1.0)


def test_presets_scale_lr_by_batch_and_follow_their_granularity():
    v1 = preset("v1", "resnet50")
    assert math.isclose(learning_rate(v1, 0.5), 0.03) and v1.lr_schedule == "step"
    assert math.isclose(learning_rate(v1, 120.7), 0.003)
    v2 = preset("v2", "resnet50")  # per epoch: 0.9 of an epoch still uses epoch 0's lr
    assert learning_rate(v2, 0.9) == learning_rate(v2, 0.0) == 0.03
    assert momentum(v2, 50.0) == 0.999 and v2.T == 0.2
    v3 = preset("v3", "resnet50")  # per iteration, 0.6 x 4096/256 after 10 warmup epochs
    assert math.isclose(learning_rate(v3, 10.0), 0.6 * 16)
    assert math.isclose(learning_rate(v3, 0.5), 0.6 * 16 * 0.05)
    assert momentum(v3, 0.0) == 0.99 and momentum(v3, 50.0) > 0.99
    assert v3.optimizer == "lars" and v3.T == 1.0 and not v3.pred_last_bn


def test_inconsistent_configs_are_refused():
    with pytest.raises(ConfigError, match="queue_size=0"):
        preset("v3", "resnet18", queue_size=16)
    with pytest.raises(ConfigError, match="arch"):
        preset("v2", "resnet101")
    # Small inputs keep the standard stem: the 3x3/1 stem costs ~20x the compute (issue 10).
    assert not preset("v2", "resnet18", input_size=32).small_stem
    assert preset("v2", "resnet18", input_size=32, small_stem=True).small_stem


def test_lars_scales_matrix_updates_and_leaves_vectors_plain():
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))  # norm 4
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)
    w.grad, b.grad = torch.ones(2, 2), torch.ones(2)
    opt.step()
    dp = torch.ones(2, 2) + 0.5 * 2.0  # grad + wd * w = 2 everywhere, norm 4
    ratio = 0.1 * 4.0 / 4.0
    assert torch.allclose(w, torch.full((2, 2), 2.0) - ratio * dp)
    assert torch.allclose(b, torch.zeros(2))  # 1 - lr * grad: no decay, no trust ratio


def test_build_optimizer_follows_the_preset():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert isinstance(build_optimizer(preset("v2", "resnet18"), params), torch.optim.SGD)
    assert isinstance(build_optimizer(preset("v3", "resnet18"), params), LARS)
    assert isinstance(build_optimizer(preset("v3", "vit_small"), params), torch.optim.AdamW)
