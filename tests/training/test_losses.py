"""The InfoNCE losses against hand-written references, and MoCo v3's symmetric loss."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from training.config import preset
from training.losses import info_nce_batch, info_nce_queue
from training.moco import build_moco, project


def _ref_queue_loss(q, k, queue, T):
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / T)
        neg = sum(math.exp(float(q[i] @ queue[:, j]) / T) for j in range(queue.shape[1]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_queue_loss_matches_reference():
    q = F.normalize(torch.randn(5, 7), dim=1)
    k = F.normalize(torch.randn(5, 7), dim=1)
    queue = F.normalize(torch.randn(7, 11), dim=0)
    got = info_nce_queue(q, k, queue, T=0.2)
    assert math.isclose(float(got), _ref_queue_loss(q, k, queue, 0.2), rel_tol=1e-5)


def test_batch_loss_matches_reference_with_offset_and_2T_scale():
    q, k_all = torch.randn(3, 4), torch.randn(6, 4)  # this process holds keys 3..5 (rank 1)
    T = 0.5
    qn, kn = F.normalize(q, dim=1), F.normalize(k_all, dim=1)
    ref = 0.0
    for i in range(3):
        logits = [float(qn[i] @ kn[j]) / T for j in range(6)]
        ref += -logits[3 + i] + math.log(sum(math.exp(v) for v in logits))
    ref = ref / 3 * 2 * T
    assert math.isclose(float(info_nce_batch(q, k_all, T, offset=3)), ref, rel_tol=1e-5)


def _tiny_v3():
    cfg = preset("v3", "resnet18", input_size=8, dim=8, mlp_dim=16, batch_size=8)
    return build_moco(cfg)


def test_v3_loss_is_symmetric_sum_of_both_directions():
    torch.manual_seed(0)
    model = _tiny_v3()
    ref = copy.deepcopy(model)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    loss = model(x1, x2, m=1.0)  # m=1: the momentum encoder stays what the copy holds
    q1 = ref.predictor(project(ref.base_encoder, x1))
    q2 = ref.predictor(project(ref.base_encoder, x2))
    with torch.no_grad():
        k1, k2 = project(ref.momentum_encoder, x1), project(ref.momentum_encoder, x2)
    expected = info_nce_batch(q1, k2, ref.T) + info_nce_batch(q2, k1, ref.T)
    assert torch.allclose(loss, expected, atol=1e-6)
    swapped = copy.deepcopy(ref)(x2, x1, m=1.0)  # symmetric: swapping the views changes nothing
    assert torch.allclose(loss, swapped, atol=1e-6)


def test_v3_gradient_reaches_base_and_predictor_not_momentum():
    model = _tiny_v3()
    model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), m=0.99).backward()
    assert model.predictor[0].weight.grad is not None
    assert model.base_encoder.head[0].weight.grad is not None
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
