"""Run by the torchrun test in each of two CPU processes: MoCo v2 (shuffle-BN across
processes) through ``train()``, then v3 (keys gathered across processes) through the CLI,
in one process group so that the processes start (and import torch) only once."""

from __future__ import annotations

import sys

from training.config import preset
from training.loaders import DataOptions
from training.pretrain import RunOptions, main, train

TINY = [
    "--arch",
    "resnet18",
    "--input-size",
    "8",
    "--batch-size",
    "8",
    "--dim",
    "8",
    "--mlp-dim",
    "16",
    "--epochs",
    "1",
    "--limit-train",
    "16",
    "--knn-bank",
    "32",
    "--knn-val",
    "16",
    "--log-every",
    "1",
    "--device",
    "cpu",
]

if __name__ == "__main__":
    out = sys.argv[1]
    cfg = preset(
        "v2",
        "resnet18",
        input_size=8,
        batch_size=8,
        dim=8,
        mlp_dim=16,
        epochs=1,
        queue_size=32,
        shuffle_bn_groups=2,
    )
    data = DataOptions(data="fashion-mnist", limit_train=16, knn_bank=32, knn_val=16)
    train(cfg, data, RunOptions(out_dir=f"{out}/v2", device="cpu", log_every=1))
    sys.exit(main(["--out-dir", f"{out}/v3", "--version", "v3", "--warmup-epochs", "0.5", *TINY]))
