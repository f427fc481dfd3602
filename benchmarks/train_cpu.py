"""MoCo training speed on this CPU against the plain forward+backward rate of the backbone.

For MoCo v1, v2 and v3 with a ResNet-18 at 32 px (Fashion-MNIST's size, standard stem), in one
run and at the same batch size and precision, it measures:

- plain: forward + backward + SGD step of the backbone alone on a ready-made batch;
- training: ``training.pretrain.train_step`` on freshly augmented view pairs of Fashion-MNIST
  images (the batched augmentation included), i.e. the rate ``python -m training.pretrain``
  logs as images/s.

The two are measured in alternation, several rounds each, and each rate is the median of its
rounds, so that another process on the machine slows both alike. Goals (issue 10): v1/v2
≥ 0.6x plain (a MoCo v1/v2 step does about 4 forward-equivalents per image against 3: 0.75x
is the ceiling), v3 ≥ 0.3x (two views through both encoders: 0.375x).

    python benchmarks/train_cpu.py                     # bf16 where native, batch 256
    python benchmarks/train_cpu.py --precision fp32 --append-results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import append_section

from mocoretrieval.backbones import build_backbone
from training.augment import BatchAugment
from training.config import preset
from training.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist
from training.moco import build_moco
from training.optim import build_optimizer
from training.pretrain import train_step
from training.runtime import autocast, resolve_precision, set_cpu_threads

GOALS = {"v1": 0.6, "v2": 0.6, "v3": 0.3}
CEILINGS = {"v1": 0.75, "v2": 0.75, "v3": 0.375}


def recipe(version: str, batch: int):
    """The version's preset at 32 px; v1/v2 with a queue that fits Fashion-MNIST."""
    extra = {} if version == "v3" else {"queue_size": 4096}
    return preset(version, "resnet18", input_size=32, batch_size=batch, **extra)


class Plain:
    """Forward + backward + SGD step of the bare backbone (and a linear classifier): a
    ResNet-18 at 32 px unless ``backbone`` and ``size`` say otherwise."""

    def __init__(
        self, batch: int, precision: str, size: int = 32, backbone: torch.nn.Module | None = None
    ) -> None:
        backbone = build_backbone("resnet18") if backbone is None else backbone
        self.net = torch.nn.Sequential(backbone, torch.nn.Linear(512, 10))
        self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,))
        self.precision = precision

    def step(self) -> None:
        with autocast(self.x.device, self.precision):
            loss = F.cross_entropy(self.net(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class MoCoSteps:
    """``train_step`` of ``python -m training.pretrain`` on augmented Fashion-MNIST pairs."""

    def __init__(self, version: str, batch: int, precision: str, images: torch.Tensor) -> None:
        cfg = recipe(version, batch)
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        self.model = build_moco(cfg, mean, std).to(memory_format=torch.channels_last)
        self.opt = build_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
        self.aug = [BatchAugment(cfg, v, mean, std) for v in (0, 1)]
        self.images, self.batch, self.precision, self.i = images, batch, precision, 0

    def step(self) -> None:
        s = (self.i * self.batch) % (len(self.images) - self.batch)
        x = self.images[s : s + self.batch]
        self.i += 1
        x1, x2 = self.aug[0](x), self.aug[1](x)
        train_step(self.model, self.opt, x1, x2, 0.03, 0.99, self.precision, True)


def rate(runner, batch: int, steps: int) -> float:
    """Images/s over ``steps`` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", nargs="+", default=["v1", "v2", "v3"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--rounds", type=int, default=3, help="alternations of plain and training")
    p.add_argument("--steps", type=int, default=4, help="steps per measurement")
    p.add_argument("--append-results", action="store_true", help="append to RESULTS.md")
    args = p.parse_args()

    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    threads = set_cpu_threads(device)
    torch.manual_seed(0)
    images, _ = fashion_mnist("train", limit=4096)
    plain = Plain(args.batch_size, precision)
    rows = []
    for version in args.versions:
        moco = MoCoSteps(version, args.batch_size, precision, images)
        plain.step(), moco.step()  # warm-up: oneDNN builds its kernels on first use
        plain_rates, train_rates = [], []
        for _ in range(args.rounds):
            plain_rates.append(rate(plain, args.batch_size, args.steps))
            train_rates.append(rate(moco, args.batch_size, args.steps))
        p_med, t_med = statistics.median(plain_rates), statistics.median(train_rates)
        rows.append((version, p_med, t_med, t_med / p_med))
        print(
            f"{version}: plain {p_med:.0f} img/s, training {t_med:.0f} img/s, "
            f"ratio {t_med / p_med:.2f}",
            flush=True,
        )

    lines = [
        (
            f"CPU: {torch.get_num_threads()} torch threads ({threads} set), precision {precision}, "
            f"batch {args.batch_size}, ResNet-18 at 32 px (standard stem), channels_last; "
            f"median of {args.rounds} alternating rounds of {args.steps} steps."
        ),
        "",
        "| version | plain fwd+bwd img/s | training img/s | ratio | goal | ceiling | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for version, p_med, t_med, ratio in rows:
        met = "yes" if ratio >= GOALS[version] else "no"
        lines.append(
            f"| {version} | {p_med:.0f} | {t_med:.0f} | {ratio:.2f}x | ≥ {GOALS[version]}x "
            f"| {CEILINGS[version]}x | {met} |"
        )
    body = "\n".join(lines)
    print(body)
    if args.append_results:
        append_section("train_cpu", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
