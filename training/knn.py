"""Weighted kNN monitor (Wu et al. 2018; k=200, T=0.1 as in the MoCo CIFAR-10 demo)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Labels predicted by the ``k`` most similar bank entries, each voting ``exp(sim / t)``.

    Args:
        features: queries, (N, D), L2-normalised.
        bank: (M, D), L2-normalised.
        bank_labels: (M,) int64.
        num_classes: number of labels.
        k: neighbours (capped at the bank size).
        t: temperature of the vote weights.
        exclude_self: the queries are the first N bank rows; leave each one out of its vote.

    Returns:
        (N,) int64 predicted labels.
    """
    sim = features @ bank.T  # (N, M)
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    k = min(k, bank.shape[0] - int(exclude_self))
    sim_w, sim_i = sim.topk(k, dim=1)  # (N, k)
    sim_labels = bank_labels[sim_i]  # (N, k)
    weights = (sim_w / t).exp()
    scores = torch.zeros(features.shape[0], num_classes, device=features.device)
    scores.scatter_add_(1, sim_labels, weights)  # (N, classes)
    return scores.argmax(dim=1)


@torch.no_grad()
def knn_accuracy(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of :func:`knn_predict`; without a bank, leave-one-out on the queries."""
    leave_one_out = bank is None
    if leave_one_out:
        bank, bank_labels = queries, query_labels
    num_classes = int(max(query_labels.max(), bank_labels.max())) + 1
    correct = 0
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk]
        if leave_one_out:  # rotate the bank so that the chunk's own rows come first
            order = torch.cat(
                [
                    torch.arange(s, s + q.shape[0]),
                    torch.arange(0, s),
                    torch.arange(s + q.shape[0], bank.shape[0]),
                ]
            ).to(bank.device)
            pred = knn_predict(q, bank[order], bank_labels[order], num_classes, k, t, True)
        else:
            pred = knn_predict(q, bank, bank_labels, num_classes, k, t)
        correct += int((pred == query_labels[s : s + chunk]).sum())
    return correct / queries.shape[0]


@torch.no_grad()
def extract(
    backbone: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    autocast: bool = False,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """L2-normalised backbone features of preprocessed batches, in eval mode; (N, D) float32.

    ``autocast`` runs the backbone under bf16 autocast; ``memory_format`` (channels_last) is
    the layout the backbone was put in.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    for x in batches:
        x = x.to(device, non_blocking=True)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(F.normalize(backbone(x).float(), dim=1))
    backbone.train(was_training)
    return torch.cat(out)
