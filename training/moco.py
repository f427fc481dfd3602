"""MoCo: a base encoder, its momentum copy, and the contrastive loss of v1/v2 (queue) or v3.

Read alongside He et al. 2020 (Alg. 1), Chen et al. 2020 and Chen, Xie, He 2021 (Alg. 1).
Nothing here calls CUDA or assumes a process group: ``training.dist`` falls back to one process.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mocoretrieval.encoder import MoCoEncoder

from . import dist
from .config import ConfigError, PretrainConfig
from .heads import build_base_encoder, build_predictor
from .losses import info_nce_batch, info_nce_queue


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed over ``num_splits`` sub-batches.

    One process then normalises like ``num_splits`` GPUs would, each over its own share of the
    batch; this is what makes shuffle-BN meaningful on one device (MoCo CIFAR demo). Sub-batch
    ``g`` is the ``g``-th contiguous slice of the batch, as the ``g``-th GPU's share would be.
    On a CPU each slice goes through its own ``F.batch_norm``; elsewhere the slices are laid side
    by side as channels, (N/G, G*C, H, W) as in the demo, but built in channels_last (the demo's
    reshape copies to NCHW and back), so one fused BatchNorm normalises every group. The output
    keeps the input's memory layout. Parameters and buffers are those of ``nn.BatchNorm2d``, so
    state dicts are interchangeable; evaluation uses running statistics.
    """

    num_splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        if x.shape[0] % g:
            raise ValueError(
                f"batch of {x.shape[0]} does not split into {g} BN groups; change batch_size"
            )
        # Measured (RESULTS.md, "train_gpu"): on 2 CPU cores one BatchNorm per group is
        # fastest (0.30 s per fmnist-cpu v2 step against 0.38 s all groups at once); on an
        # H200 at batch 512 a v2 step took 55 ms with one BatchNorm per group and 54 ms with
        # the groups' statistics computed in float32 elementwise (instead of this fusion),
        # against 28 ms with no groups at all: there all groups go through one fused kernel.
        if x.device.type == "cpu":
            return self.forward_per_group(x)
        return self.forward_all_groups(x)

    def forward_per_group(self, x: torch.Tensor) -> torch.Tensor:
        """One ``F.batch_norm`` per group (and two buffer copies each): few, large kernels on a
        CPU, a launch-bound crowd of small ones on a GPU."""
        momentum = 0.1 if self.momentum is None else self.momentum
        outs, means, variances = [], [], []
        for part in x.split(x.shape[0] // self.num_splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(
                F.batch_norm(part, mean, var, self.weight, self.bias, True, momentum, self.eps)
            )
            means.append(mean)
            variances.append(var)
        with torch.no_grad():  # one set of running statistics: the mean over the groups
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outs)

    def forward_all_groups(self, x: torch.Tensor) -> torch.Tensor:
        """One fused ``F.batch_norm`` for every group: the groups side by side as channels,
        (N/G, G*C, H, W) in channels_last, one copy in and one out ([demo]'s reshape, without
        its round trip through NCHW)."""
        g, (n, c, h, w) = self.num_splits, x.shape
        stacked = torch.empty(
            (n // g, g * c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )
        stacked.view(n // g, g, c, h, w).copy_(x.view(g, n // g, c, h, w).transpose(0, 1))
        momentum = 0.1 if self.momentum is None else self.momentum
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        weight = None if self.weight is None else self.weight.repeat(g)
        bias = None if self.bias is None else self.bias.repeat(g)
        y = F.batch_norm(stacked, mean, var, weight, bias, True, momentum, self.eps)
        with torch.no_grad():  # one set of running statistics: the mean over the groups
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        out = torch.empty_like(x)  # the input's layout
        out.view(g, n // g, c, h, w).copy_(y.view(n // g, g, c, h, w).transpose(0, 1))
        return out


def use_split_bn(module: nn.Module, num_splits: int) -> None:
    """Makes every ``BatchNorm2d`` in ``module`` a :class:`SplitBatchNorm2d` (in place)."""
    for m in module.modules():
        if type(m) in (nn.BatchNorm2d, SplitBatchNorm2d):
            m.__class__ = SplitBatchNorm2d
            m.num_splits = num_splits


def project(encoder: MoCoEncoder, x: torch.Tensor) -> torch.Tensor:
    """Backbone then projection head: (N, 3, H, W) -> (N, dim), not normalised."""
    return encoder.head(encoder.backbone(x))


class MomentumPair(nn.Module):
    """A base encoder trained by gradient and a momentum encoder that follows it (EMA)."""

    def __init__(self, base_encoder: MoCoEncoder, T: float) -> None:
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder)  # starts equal (MoCo Alg. 1)
        self.momentum_encoder.requires_grad_(False)  # updated by momentum, not by gradient

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q (He et al. 2020, Eq. 2)."""
        base = [p.detach() for p in self.base_encoder.parameters()]
        mom = list(self.momentum_encoder.parameters())
        torch._foreach_lerp_(mom, base, 1.0 - m)  # one pass: m * k + (1 - m) * q


class MoCo(MomentumPair):
    """MoCo v1/v2: keys from the momentum encoder, negatives from a queue of past keys."""

    def __init__(
        self, base_encoder: MoCoEncoder, dim: int, K: int, T: float, bn_splits: int = 1
    ) -> None:
        super().__init__(base_encoder, T)
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # (C, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if bn_splits > 1:
            use_split_bn(self.base_encoder, bn_splits)
            use_split_bn(self.momentum_encoder, bn_splits)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replaces the oldest keys of the queue by ``keys`` (N, C), wrapping around its end."""
        n, K = keys.shape[0], self.queue.shape[1]
        if n > K:
            raise ValueError(f"a batch of {n} keys does not fit a queue of {K}; raise queue_size")
        # The pointer stays on the device: reading it (int(...)) would wait for the GPU every step.
        idx = (torch.arange(n, device=keys.device) + self.queue_ptr) % K  # (N,)
        self.queue.index_copy_(1, idx, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(K)

    @torch.no_grad()
    def shuffled_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of ``x`` computed with shuffle-BN (He et al. 2020, Sec. 3.3): the batch of all
        processes is permuted before the momentum encoder and restored after it, so a query and
        its key are normalised with different sub-batches' statistics."""
        n, rank = x.shape[0], dist.get_rank()
        x_all = dist.all_gather(x)  # (W*N, 3, H, W)
        perm = dist.broadcast(torch.randperm(x_all.shape[0], device=x.device), 0)
        k = F.normalize(
            project(self.momentum_encoder, x_all[perm[rank * n : (rank + 1) * n]]), dim=1
        )
        k_all = dist.all_gather(k)  # (W*N, C), in shuffled order
        return k_all[torch.argsort(perm)][rank * n : (rank + 1) * n]  # (N, C), original order

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """The loss of one step; updates the momentum encoder first and the queue last."""
        q = F.normalize(project(self.base_encoder, x1), dim=1)  # (N, C)
        with torch.no_grad():
            self.momentum_update(m)
            k = self.shuffled_keys(x2)  # (N, C)
        # The queue is cloned: enqueue() below changes it before backward needs it.
        loss = info_nce_queue(q, k, self.queue.clone(), self.T)
        self.enqueue(dist.all_gather(k))
        return loss


class SymmetricMoCo(MoCo):
    """MoCo v1/v2 with [demo]'s symmetric loss: ``ctr(q1, k2) + ctr(q2, k1)`` against one queue,
    and both views' keys enqueued after it."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = F.normalize(project(self.base_encoder, x1), dim=1)  # (N, C)
        q2 = F.normalize(project(self.base_encoder, x2), dim=1)  # (N, C)
        with torch.no_grad():
            self.momentum_update(m)
            k1, k2 = self.shuffled_keys(x1), self.shuffled_keys(x2)  # (N, C) each
        queue = self.queue.clone()
        loss = info_nce_queue(q1, k2, queue, self.T) + info_nce_queue(q2, k1, queue, self.T)
        self.enqueue(dist.all_gather(torch.cat([k1, k2])))
        return loss


class MoCoV3(MomentumPair):
    """MoCo v3: no queue; a predictor on the queries and a symmetric loss over batch keys."""

    def __init__(self, base_encoder: MoCoEncoder, predictor: nn.Module, T: float) -> None:
        super().__init__(base_encoder, T)
        self.predictor = predictor

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """ctr(q, k) with the keys of every process; positives sit at ``N * rank + i``."""
        return info_nce_batch(q, dist.all_gather(k), self.T, offset=q.shape[0] * dist.get_rank())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(project(self.base_encoder, x1))  # (N, C)
        q2 = self.predictor(project(self.base_encoder, x2))  # (N, C)
        with torch.no_grad():
            self.momentum_update(m)
            k1 = project(self.momentum_encoder, x1)  # (N, C)
            k2 = project(self.momentum_encoder, x2)  # (N, C)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


def build_moco(cfg: PretrainConfig, mean=None, std=None, world_size: int = 1) -> MomentumPair:
    """The model of ``cfg``; ``world_size`` processes share the shuffle-BN groups."""
    encoder = build_base_encoder(cfg, mean, std, source="mocoretrieval training.pretrain")
    if cfg.version == "v3":
        return MoCoV3(encoder, build_predictor(cfg), cfg.T)
    if cfg.shuffle_bn_groups % world_size and world_size % cfg.shuffle_bn_groups:
        raise ConfigError(
            f"shuffle_bn_groups={cfg.shuffle_bn_groups} does not divide among {world_size} "
            "processes; use a multiple or divisor of the number of processes"
        )
    splits = max(1, cfg.shuffle_bn_groups // world_size)
    cls = SymmetricMoCo if cfg.symmetric else MoCo
    return cls(encoder, cfg.dim, cfg.queue_size, cfg.T, bn_splits=splits)
