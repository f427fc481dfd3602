"""InfoNCE losses of MoCo v1/v2 (queue of negatives) and v3 (in-batch keys, symmetric).

Both are computed in float32 (float64 inputs stay float64) with autocast switched off, whatever
the caller's precision: under bf16 autocast an einsum returns bf16 even from float32 inputs, and
logits of 65,537 keys divided by T=0.07 need more than bf16's 8 bits of mantissa to rank the
positive correctly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype if that is wider."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """MoCo v1/v2 loss (He et al. 2020, Eq. 1): the positive key against the queue's negatives.

    Args:
        q: queries, (N, C), L2-normalised.
        k: their positive keys, (N, C), L2-normalised, no gradient.
        queue: negative keys, (C, K), L2-normalised.
        T: softmax temperature.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = _wide(q), _wide(k), _wide(queue.detach())
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
        l_neg = torch.einsum("nc,ck->nk", q, queue)  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / T  # (N, 1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels)


def info_nce_batch(q: torch.Tensor, k_all: torch.Tensor, T: float, offset: int = 0) -> torch.Tensor:
    """MoCo v3 ``ctr(q, k)`` (Chen et al. 2021, Alg. 1): keys of the whole batch, scaled by 2T.

    Args:
        q: this process's queries, (N, C), not necessarily normalised.
        k_all: the keys of every process concatenated in rank order, (M, C), no gradient.
        T: softmax temperature.
        offset: index of this process's first key in ``k_all`` (``N * rank``).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(_wide(q), dim=1)
        k_all = F.normalize(_wide(k_all), dim=1)
        logits = torch.einsum("nc,mc->nm", q, k_all) / T  # (N, M)
        labels = torch.arange(q.shape[0], device=q.device) + offset
        # The 2T factor makes the gradient's scale independent of T (moco-v3 builder.py).
        return F.cross_entropy(logits, labels) * (2 * T)
