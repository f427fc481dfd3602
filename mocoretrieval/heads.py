"""MLP heads shared by the encoder (projection) and training (projector, predictor)."""

from __future__ import annotations

from torch import nn


def build_mlp(
    num_layers: int,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    batch_norm: bool = False,
    last_bn: bool = False,
    bias: bool = True,
) -> nn.Module:
    """Builds the heads of the three MoCo papers with their official parameter names.

    - v1 (He et al. 2020): ``num_layers=1``: one ``Linear`` (keys ``0.*`` are avoided: a single
      layer is returned bare so its keys are ``weight``/``bias`` like the official ``fc``).
    - v2 (Chen et al. 2020): ``num_layers=2``: ``Linear, ReLU, Linear`` with biases.
    - v3 (Chen, Xie, He 2021, ``moco/builder.py``): ``batch_norm=True, bias=False``: every hidden
      ``Linear`` is followed by BN and ReLU; the last one by a BN without affine parameters
      (``last_bn=True``, after SimCLR) or by nothing.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got num_layers={num_layers}")
    if num_layers == 1 and not last_bn:
        return nn.Linear(in_dim, out_dim, bias=bias)
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < num_layers - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
