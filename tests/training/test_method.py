"""The core of the method, checked against reference computations written here: keys come from
the momentum encoder updated by this step, the loss sees the queue as it was before this
batch, and the base encoder (not its momentum copy) is what a run evaluates and exports.

Each test was checked by breaking the behaviour it guards once and watching it fail; its
docstring says how.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocoretrieval import MoCoEncoder
from training import checkpoint as ckpt_io
from training import pretrain
from training.config import preset
from training.loaders import DataOptions
from training.moco import build_moco
from training.pretrain import RunOptions, train

N, M = 8, 0.5  # batch size; a momentum far from 0 and 1, so stale, updated and base all differ


def _tiny(version: str, **kw):
    # One shuffle-BN group: the keys then do not depend on the permutation drawn.
    args = {"input_size": 8, "dim": 8, "mlp_dim": 16, "batch_size": N}
    if version != "v3":
        args.update(queue_size=32, shuffle_bn_groups=1)
    args.update(kw)
    torch.manual_seed(0)
    model = build_moco(preset(version, "resnet18", **args))
    with torch.no_grad():  # as after some training: the base encoder has left its momentum copy
        for p in model.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # float64: the references below sum in another order than the model's kernels, and in float32
    # that alone moved one gradient by 2e-5 on a CI host. In float64 a broken method still shows.
    return model.double()


def _project(encoder: MoCoEncoder, x: torch.Tensor) -> torch.Tensor:
    return encoder.head(encoder.backbone(x))


def _ema(base: MoCoEncoder, momentum: MoCoEncoder, m: float) -> MoCoEncoder:
    """A copy of ``momentum`` with theta_k = m * theta_k + (1 - m) * theta_q (He et al., Eq. 2)."""
    updated = copy.deepcopy(momentum)
    with torch.no_grad():
        for pk, pq in zip(updated.parameters(), base.parameters()):
            pk.copy_(m * pk + (1 - m) * pq)
    return updated


def _reference(model: nn.Module) -> tuple[MoCoEncoder, MoCoEncoder]:
    """Copies of the base encoder before the step and of the momentum encoder after its update."""
    base = copy.deepcopy(model.base_encoder)
    return base, _ema(base, model.momentum_encoder, M)


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (N, 3, 8, 8)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )


# --- MoCo v1/v2: momentum update, keys and queue ---------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_keys_come_from_the_momentum_encoder_updated_by_this_step(version):
    """Fails when the momentum update is deleted from ``MoCo.forward`` or moved after the key
    forward (keys then come from the stale momentum encoder): checked by deleting
    ``self.momentum_update(m)``, by swapping it with the ``shuffled_keys`` line, and by moving
    it out of ``forward`` to after ``optimizer.step()`` in ``training/pretrain.py``."""
    model = _tiny(version)
    base, momentum = _reference(model)
    x1, x2 = _views()
    with torch.no_grad():
        stale = F.normalize(_project(copy.deepcopy(model.momentum_encoder), x2), dim=1)
        expected = F.normalize(_project(momentum, x2), dim=1)  # (N, C)
    assert not torch.allclose(stale, expected, atol=1e-3)  # the test can tell them apart
    model(x1, x2, M)
    keys = model.queue[:, :N].T  # the queue starts at column 0: this batch's keys, (N, C)
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-4)
    for p, ref in zip(model.momentum_encoder.parameters(), momentum.parameters()):
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=1e-5)
    for p, ref in zip(model.base_encoder.parameters(), base.parameters()):
        assert torch.equal(p, ref)  # forward leaves the base encoder to the optimizer


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_loss_is_info_nce_against_the_queue_before_this_batch(version):
    """Base-encoder queries, updated-momentum keys, and the queue as it was before this batch's
    keys went in (a key is never its own negative); gradients reach the base encoder only.

    Fails when the keys are enqueued before the loss: checked by moving
    ``self.enqueue(dist.all_gather(k))`` above ``loss = ...`` in ``MoCo.forward``. Fails too when
    the momentum update is deleted (checked)."""
    model = _tiny(version)
    base, momentum = _reference(model)
    queue = model.queue.clone()  # (C, K)
    x1, x2 = _views()
    q = F.normalize(_project(base, x1), dim=1)  # (N, C)
    with torch.no_grad():
        k = F.normalize(_project(momentum, x2), dim=1)  # (N, C)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / model.T  # (N, 1+K)
    expected = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))
    # Had this batch's keys been in the queue, the loss would be another: the test sees it.
    stale_logits = torch.cat([logits[:, :1], q @ torch.cat([k.T, queue[:, N:]], 1) / model.T], 1)
    assert abs(F.cross_entropy(stale_logits, torch.zeros(N, dtype=torch.long)) - expected) > 1e-2

    loss = model(x1, x2, M)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    expected.backward()
    for p, ref in zip(model.base_encoder.parameters(), base.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-3)
    assert all(p.grad is None for p in model.momentum_encoder.parameters())


def test_symmetric_v2_loss_swaps_the_views_and_enqueues_both_keys():
    """``symmetric=True`` ([demo]): ``ctr(q1, k2) + ctr(q2, k1)`` against the queue before the
    batch, then the keys of both views enqueued (view 1's first).

    Fails when one of the two terms is dropped (checked: loss = the first term only), when the
    keys are enqueued before the loss (checked), and when only ``k2`` is enqueued (checked)."""
    model = _tiny("v2", symmetric=True)
    base, momentum = _reference(model)
    queue = model.queue.clone()  # (C, K)
    x1, x2 = _views()
    q1, q2 = F.normalize(_project(base, x1), dim=1), F.normalize(_project(base, x2), dim=1)
    with torch.no_grad():
        k1 = F.normalize(_project(momentum, x1), dim=1)  # (N, C)
        k2 = F.normalize(_project(momentum, x2), dim=1)

    def ctr(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / model.T
        return F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))

    expected = ctr(q1, k2) + ctr(q2, k1)
    loss = model(x1, x2, M)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert int(model.queue_ptr) == 2 * N
    torch.testing.assert_close(model.queue[:, : 2 * N].T, torch.cat([k1, k2]), atol=1e-5, rtol=1e-4)
    loss.backward()
    expected.backward()
    for p, ref in zip(model.base_encoder.parameters(), base.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-3)


# --- MoCo v3: momentum update, predictor, symmetric loss -------------------------------------


def _ctr(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    """MoCo v3 Alg. 1: in-batch InfoNCE of normalised q against normalised k, scaled by 2T."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / T  # (N, N)
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * T


def test_v3_loss_is_symmetric_with_predictor_queries_and_updated_momentum_keys():
    """Fails when the momentum update is deleted from ``MoCoV3.forward`` or moved after the key
    forwards: checked by deleting ``self.momentum_update(m)``, by moving it below ``k2 = ...``,
    and by moving it out of ``forward`` to after ``optimizer.step()`` in ``training/pretrain.py``."""
    model = _tiny("v3")
    base, momentum = _reference(model)
    predictor = copy.deepcopy(model.predictor)
    x1, x2 = _views()
    q1, q2 = predictor(_project(base, x1)), predictor(_project(base, x2))  # (N, C)
    with torch.no_grad():
        k1, k2 = _project(momentum, x1), _project(momentum, x2)  # (N, C)
        stale = copy.deepcopy(model.momentum_encoder)
        s1, s2 = _project(stale, x1), _project(stale, x2)
    expected = _ctr(q1, k2, model.T) + _ctr(q2, k1, model.T)
    assert abs(_ctr(q1, s2, model.T) + _ctr(q2, s1, model.T) - expected) > 1e-3

    loss = model(x1, x2, M)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for p, ref in zip(model.momentum_encoder.parameters(), momentum.parameters()):
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=1e-5)
    loss.backward()
    expected.backward()
    for p, ref in zip(model.base_encoder.parameters(), base.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-3)
    for p, ref in zip(model.predictor.parameters(), predictor.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-3)


# --- a run evaluates and exports the base encoder --------------------------------------------


def _weights(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_run_evaluates_and_exports_the_base_encoder(tmp_path, monkeypatch, version):
    """Fails when the momentum encoder is exported or monitored instead of the base encoder:
    checked by setting ``_PREFIX = "momentum_encoder."`` in ``training/export.py``, and by
    passing ``moco.momentum_encoder.backbone`` to ``evaluate_knn`` in ``training/pretrain.py``."""
    seen = {}

    def evaluate_knn(backbone, *args):
        seen.update({k: v.clone() for k, v in backbone.state_dict().items()})
        return 0.5

    monkeypatch.setattr(pretrain, "evaluate_knn", evaluate_knn)
    args = {"input_size": 8, "batch_size": N, "dim": 8, "mlp_dim": 16, "epochs": 1, "m": 0.9}
    if version == "v3":
        args.update(warmup_epochs=0.5)
    else:
        args.update(queue_size=32, shuffle_bn_groups=2)
    data = DataOptions(data="fashion-mnist", limit_train=16, knn_bank=8, knn_val=8)
    run = RunOptions(out_dir=str(tmp_path), device="cpu")
    summary = train(preset(version, "resnet18", **args), data, run)

    state = ckpt_io.load(summary["checkpoint"])
    base = _weights(state, "base_encoder.")
    momentum = _weights(state, "momentum_encoder.")
    # Two steps of training with m < 1 leave the two encoders apart, so the test can tell.
    assert any(not torch.equal(base[k], momentum[k]) for k in base)
    exported = MoCoEncoder.from_pretrained(summary["encoder"]).state_dict()
    assert exported.keys() == base.keys()
    for k, v in exported.items():
        assert torch.equal(v, base[k]), k
    # The kNN monitor ran after the last step, on the weights the checkpoint holds.
    backbone = {k[len("backbone.") :]: v for k, v in base.items() if k.startswith("backbone.")}
    assert seen.keys() == backbone.keys()
    for k, v in seen.items():
        assert torch.equal(v, backbone[k]), k
