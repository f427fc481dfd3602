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


# --- LARS against MoCo v3's, and why it is not timm's ------------------------------------------


@torch.no_grad()
def _moco_v3_lars_step(params, state, lr, weight_decay, momentum=0.9, trust_coefficient=0.001):
    """``LARS.step`` of facebookresearch/moco-v3 (``moco/optimizer.py``), kept as the reference:
    no weight decay or trust ratio for parameters of 1 dimension (biases, norms)."""
    for p in params:
        dp = p.grad
        if dp is None:
            continue
        if p.ndim > 1:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(
                param_norm > 0.0,
                torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm, one),
                one,
            )
            dp = dp.mul(q)
        mu = state.setdefault(p, torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    )


def _train(net: torch.nn.Module, step, steps: int = 5) -> list[torch.Tensor]:
    """``steps`` optimisation steps on a fixed batch; the parameters after each."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    trajectory = []
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        step()
        trajectory.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    return trajectory


def test_lars_steps_equal_moco_v3s():
    ours, reference = _tiny_net(), _tiny_net()
    opt = LARS(ours.parameters(), lr=0.5, weight_decay=0.1)
    state: dict = {}
    got = _train(ours, opt.step)
    want = _train(
        reference, lambda: _moco_v3_lars_step(list(reference.parameters()), state, 0.5, 0.1)
    )
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _timm_lars(net: torch.nn.Module, lr: float, weight_decay: float):
    """timm's Lars set up as close to MoCo v3's as it goes: 1-D parameters in a group without
    weight decay or adaptation, the others adapted always, no eps."""
    from timm.optim import Lars

    matrices = [p for p in net.parameters() if p.ndim > 1]
    vectors = [p for p in net.parameters() if p.ndim <= 1]
    groups = [
        {"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
        {"params": vectors, "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001, eps=0.0)


def test_timm_lars_differs_from_moco_v3s_once_weight_decay_is_on():
    """Why training.optim keeps its own LARS: timm's trust ratio divides by ||g|| + wd ||w||,
    MoCo v3's by ||g + wd w|| (they agree only without weight decay), and its momentum state is
    named otherwise, so a v3 checkpoint's optimizer state would not resume."""
    for weight_decay in (0.0, 0.1):
        ours, theirs = _tiny_net(), _tiny_net()
        opt = LARS(ours.parameters(), lr=0.5, weight_decay=weight_decay)
        timm_opt = _timm_lars(theirs, lr=0.5, weight_decay=weight_decay)
        got, timm_got = _train(ours, opt.step), _train(theirs, timm_opt.step)
        close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, timm_got))
        assert close == (weight_decay == 0.0), weight_decay
    p = next(ours.parameters())
    assert set(opt.state[p]) == {"mu"} and set(timm_opt.state[next(theirs.parameters())]) == {
        "momentum_buffer"
    }
