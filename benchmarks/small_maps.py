"""ResNet-18 forward+backward with and without `backbones.Conv2d`'s matrix product on tiny maps.

At Fashion-MNIST's sizes a standard-stem ResNet's last stages see maps of 2x2 and 1x1 pixels,
where oneDNN's convolutions (and above all their backward) are slow. `mocoretrieval.backbones.
Conv2d` computes a conv over a map no larger than its kernel as one matrix product instead.
This script measures, in one process and in alternation (so that a busy machine slows both
alike), the plain forward + backward + SGD step of a ResNet-18 (batch 256, the CPU's native
precision, channels_last) with that branch and with `nn.Conv2d`'s own forward, for the input
sizes and stems the fmnist-cpu recipes use or considered:

    python benchmarks/small_maps.py --append-results
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import append_section
from train_cpu import Plain, rate

from mocoretrieval import backbones
from training.runtime import resolve_precision, set_cpu_threads

# name, input size, stem max-pool kept; the maps of layer3 / layer4 in the comment
CASES = [
    ("standard stem, 32 px", 32, True),  # 2x2 / 1x1
    ("standard stem, 48 px", 48, True),  # 3x3 / 2x2
    ("standard stem without max-pool, 32 px", 32, False),  # 4x4 / 2x2
    ("standard stem, 64 px", 64, True),  # 4x4 / 2x2
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two forwards")
    p.add_argument("--steps", type=int, default=4, help="steps per measurement")
    p.add_argument("--append-results", action="store_true", help="append to RESULTS.md")
    args = p.parse_args()

    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    threads = set_cpu_threads(device)
    torch.manual_seed(0)
    forwards = {"conv": nn.Conv2d.forward, "matmul": backbones.Conv2d.forward}
    rows = []
    try:
        for name, size, pool in CASES:
            backbone = backbones.build_backbone("resnet18")
            if not pool:
                backbone.net.maxpool = nn.Identity()
            plain = Plain(args.batch_size, precision, size, backbone)
            rates: dict[str, list[float]] = {k: [] for k in forwards}
            for _ in range(args.rounds):
                for kind, forward in forwards.items():
                    backbones.Conv2d.forward = forward
                    plain.step()  # warm-up: oneDNN builds its kernels for the shapes it meets
                    rates[kind].append(rate(plain, args.batch_size, args.steps))
            conv, matmul = (statistics.median(rates[k]) for k in forwards)
            rows.append((name, conv, matmul))
            print(f"{name}: conv {conv:.0f} img/s, matrix product {matmul:.0f} img/s", flush=True)
    finally:
        backbones.Conv2d.forward = forwards["matmul"]

    lines = [
        (
            f"CPU: {torch.get_num_threads()} torch threads ({threads} set), precision {precision}, "
            f"batch {args.batch_size}, channels_last; ResNet-18 forward + backward + SGD step, "
            f"median of {args.rounds} alternating rounds of {args.steps} steps."
        ),
        "",
        "| ResNet-18 | nn.Conv2d img/s | tiny maps as matrix products img/s | speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | {c:.0f} | {m:.0f} | {m / c:.2f}x |" for n, c, m in rows]
    body = "\n".join(lines)
    print(body)
    if args.append_results:
        append_section("small_maps", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
