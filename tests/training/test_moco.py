"""Queue, momentum update, shuffle-BN and the exported layout of the MoCo model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocoretrieval import MoCoEncoder
from training.config import preset
from training.moco import MoCo, SplitBatchNorm2d, build_moco, project, use_split_bn


def _tiny(version="v2", **kw):
    args = {
        "input_size": 8,
        "dim": 8,
        "mlp_dim": 16,
        "batch_size": 8,
        "queue_size": 32,
        "shuffle_bn_groups": 2,
    }
    if version == "v3":
        args.pop("queue_size"), args.pop("shuffle_bn_groups")
    args.update(kw)
    return build_moco(preset(version, "resnet18", **args))


def test_enqueue_fills_in_order_and_wraps_around():
    model = _tiny(queue_size=6)
    a = F.normalize(torch.randn(4, 8), dim=1)
    b = F.normalize(torch.randn(4, 8), dim=1)
    model.enqueue(a)
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], a.T)
    model.enqueue(b)  # columns 4, 5 then 0, 1
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.queue[:, 4:6], b[:2].T)
    assert torch.equal(model.queue[:, 0:2], b[2:].T)
    assert torch.equal(model.queue[:, 2:4], a[2:].T)


def test_forward_enqueues_the_batch_keys():
    model = _tiny(queue_size=16)
    before = model.queue.clone()
    model(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), m=0.99)
    assert int(model.queue_ptr) == 8
    assert not torch.equal(model.queue[:, :8], before[:, :8])
    assert torch.equal(model.queue[:, 8:], before[:, 8:])
    assert torch.allclose(model.queue[:, :8].norm(dim=0), torch.ones(8), atol=1e-5)


def _perturb(model):
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(torch.randn_like(p))


def test_momentum_update_m0_copies_and_m1_keeps():
    model = _tiny()
    _perturb(model)
    kept = [p.clone() for p in model.momentum_encoder.parameters()]
    model.momentum_update(1.0)
    assert all(torch.equal(a, b) for a, b in zip(kept, model.momentum_encoder.parameters()))
    model.momentum_update(0.0)
    for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        assert torch.equal(pb, pm)


def test_momentum_update_is_the_ema():
    model = _tiny()
    _perturb(model)
    old = [p.clone() for p in model.momentum_encoder.parameters()]
    model.momentum_update(0.9)
    for o, pb, pm in zip(old, model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        assert torch.allclose(pm, 0.9 * o + 0.1 * pb, atol=1e-6)


@pytest.mark.parametrize("path", ["forward_per_group", "forward_all_groups"])
def test_split_bn_normalises_each_sub_batch_on_its_own(path):
    # Both ways of computing it (one BatchNorm per group on a CPU, all groups at once on a
    # GPU) must equal one nn.BatchNorm2d per contiguous slice: outputs, gradients, and running
    # statistics that are the mean of the slices' own. Mutations that fail it (checked): the
    # fused path's groups interleaved (x.view(n // g, g, ...) without the transpose), its
    # running variance taken from the first group alone.
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    ref = [nn.BatchNorm2d(3) for _ in range(2)]
    for r in ref:
        r.load_state_dict(bn.state_dict())
    use_split_bn(bn, 2)
    assert isinstance(bn, SplitBatchNorm2d)
    x = (torch.randn(8, 3, 4, 4) * 3 + 1).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = getattr(bn, path)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    xr = x.detach().clone().requires_grad_()
    yr = torch.cat([ref[g](xr[4 * g : 4 * g + 4]) for g in range(2)])  # group g: g-th half
    assert torch.allclose(y, yr, atol=1e-5)
    w = torch.randn_like(yr)
    (y * w).sum().backward()
    (yr * w).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(bn.weight.grad, ref[0].weight.grad + ref[1].weight.grad, atol=1e-4)
    assert torch.allclose(bn.bias.grad, ref[0].bias.grad + ref[1].bias.grad, atol=1e-4)
    for name in ("running_mean", "running_var"):
        mean_of_groups = (getattr(ref[0], name) + getattr(ref[1], name)) / 2
        assert torch.allclose(getattr(bn, name), mean_of_groups, atol=1e-6), name
    bn.eval()
    assert torch.allclose(
        bn(x),
        nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        ),
        atol=1e-6,
    )


def test_split_bn_takes_the_all_groups_path_off_the_cpu(monkeypatch):
    bn = nn.BatchNorm2d(3)
    use_split_bn(bn, 2)
    taken = []
    monkeypatch.setattr(SplitBatchNorm2d, "forward_all_groups", lambda self, x: taken.append(1))
    bn(torch.randn(4, 3, 2, 2))
    assert not taken  # a CPU tensor: one BatchNorm per group
    bn(torch.randn(4, 3, 2, 2, device="meta"))
    assert taken == [1]


def test_shuffled_keys_are_returned_in_input_order():
    # With one BN group the statistics do not depend on the order, so shuffling then
    # unshuffling must give exactly the keys of the unshuffled batch.
    model = _tiny(shuffle_bn_groups=1)
    x = torch.randn(8, 3, 8, 8)
    keys = model.shuffled_keys(x)
    with torch.no_grad():
        plain = F.normalize(project(model.momentum_encoder, x), dim=1)
    assert torch.allclose(keys, plain, atol=1e-5)


def test_shuffle_bn_changes_key_statistics_with_groups():
    model = _tiny(shuffle_bn_groups=4)
    assert isinstance(model.momentum_encoder.backbone.net.bn1, SplitBatchNorm2d)
    x = torch.randn(8, 3, 8, 8)
    torch.manual_seed(1)
    a = model.shuffled_keys(x)
    torch.manual_seed(2)
    b = model.shuffled_keys(x)  # another permutation: other sub-batches, other keys
    assert not torch.allclose(a, b, atol=1e-4)


def test_base_encoder_state_loads_strictly_into_a_fresh_encoder():
    for version in ("v1", "v2", "v3"):
        model = _tiny(version)
        enc = model.base_encoder
        fresh = MoCoEncoder.from_config(enc.config)
        fresh.load_state_dict(enc.state_dict(), strict=True)
        assert all(k.startswith(("backbone.net.", "head.")) for k in enc.state_dict())


def test_v3_heads_follow_the_official_layout():
    model = _tiny("v3")
    proj, pred = model.base_encoder.head, model.predictor
    # projector: Linear, BN, ReLU, Linear, BN(affine=False); no biases
    assert [type(m).__name__ for m in proj] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    assert proj[4].affine is False and proj[0].bias is None
    # ResNet predictor: no last BN (moco-v3 builder, last_bn=False)
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    vit = preset("v3", "vit_small")
    assert vit.pred_last_bn and vit.proj_layers == 3 and vit.T == 0.2 and vit.stop_grad_conv1
    assert vit.optimizer == "adamw"


def test_v1_head_is_linear_and_v2_head_is_mlp():
    assert isinstance(_tiny("v1").base_encoder.head, nn.Linear)
    head = _tiny("v2").base_encoder.head
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert isinstance(_tiny("v2"), MoCo)
