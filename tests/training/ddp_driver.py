"""Run by the torchrun test in each of two CPU processes, in one process group so that the
processes start (and import torch) only once:

1. equivalence: with BN in eval mode (no batch statistics), the losses two processes compute on
   halves of a batch, keys gathered across them, average to the one-process loss of the whole
   batch, and the v2 queue receives every process's keys in rank order;
2. MoCo v2 (shuffle-BN across processes) through ``train()``;
3. MoCo v3 (keys gathered across processes) through the CLI.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from training import dist
from training.config import preset
from training.loaders import DataOptions
from training.losses import info_nce_batch, info_nce_queue
from training.moco import build_moco, project
from training.pretrain import RunOptions, main, train

TINY = ["--arch", "resnet18", "--input-size", "8", "--batch-size", "8", "--dim", "8",
        "--mlp-dim", "16", "--epochs", "1", "--limit-train", "16", "--knn-bank", "32",
        "--knn-val", "16", "--log-every", "1", "--device", "cpu"]  # fmt: skip


def equivalence() -> dict[str, float]:
    rank, n = dist.get_rank(), 4
    torch.manual_seed(0)  # same weights and the same batch of 8 in both processes
    v2 = build_moco(preset("v2", "resnet18", input_size=8, dim=8, queue_size=32,
                           shuffle_bn_groups=2, batch_size=8), world_size=2).eval()  # fmt: skip
    v3 = build_moco(preset("v3", "resnet18", input_size=8, dim=8, mlp_dim=16, batch_size=8)).eval()
    x1, x2 = torch.randn(2 * n, 3, 8, 8), torch.randn(2 * n, 3, 8, 8)
    mine = slice(rank * n, (rank + 1) * n)
    with torch.no_grad():
        queue = v2.queue.clone()
        got = {"v2": v2(x1[mine], x2[mine], 1.0), "v3": v3(x1[mine], x2[mine], 1.0)}
        for loss in got.values():
            torch_dist.all_reduce(loss)
            loss /= 2
        q = F.normalize(project(v2.base_encoder, x1), dim=1)
        k = F.normalize(project(v2.momentum_encoder, x2), dim=1)
        ref_v2 = info_nce_queue(q, k, queue, v2.T)
        q1, q2 = (v3.predictor(project(v3.base_encoder, x)) for x in (x1, x2))
        k1, k2 = (project(v3.momentum_encoder, x) for x in (x1, x2))
        ref_v3 = info_nce_batch(q1, k2, v3.T) + info_nce_batch(q2, k1, v3.T)
    return {
        "v2": float(got["v2"]), "v2_ref": float(ref_v2),
        "v3": float(got["v3"]), "v3_ref": float(ref_v3),
        "queue_err": float((v2.queue[:, : 2 * n] - k.T).abs().max()),
    }  # fmt: skip


if __name__ == "__main__":
    out = sys.argv[1]
    torch_dist.init_process_group("gloo")
    result = equivalence()
    if dist.get_rank() == 0:
        with open(f"{out}/equivalence.json", "w") as f:
            json.dump(result, f)
    cfg = preset("v2", "resnet18", input_size=8, batch_size=8, dim=8, mlp_dim=16, epochs=1,
                 queue_size=32, shuffle_bn_groups=2)  # fmt: skip
    data = DataOptions(data="fashion-mnist", limit_train=16, knn_bank=32, knn_val=16)
    train(cfg, data, RunOptions(out_dir=f"{out}/v2", device="cpu", log_every=1))
    sys.exit(main(["--out-dir", f"{out}/v3", "--version", "v3", "--warmup-epochs", "0.5", *TINY]))
