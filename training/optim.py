"""Optimizers of the three recipes: SGD (v1/v2), LARS (v3 ResNet), AdamW (v3 ViT)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


# Not timm's Lars: trust ratio over ||g||+wd||w||, not ||g+wd w||; state not "mu" (see its test)
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MoCo v3 uses it (``moco/optimizer.py``).

    Weight decay and the layer-wise trust ratio apply to matrices and kernels only; biases and
    normalisation parameters (1-D) take plain momentum SGD steps.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    ratio = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        g["trust_coefficient"] * param_norm / update_norm,
                        one,
                    )
                    dp = dp.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``params`` (lr is set by the schedule every step)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(params, lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.AdamW(params, lr=0.0, weight_decay=cfg.weight_decay)
