"""MoCo v2 then v3 pretraining on Fashion-MNIST (ResNet-18, small stem): throughput and kNN
accuracy per epoch, against the plain forward/backward rate of the same backbone, in one run.

Prepared for one GPU within a fixed wall-clock budget (default 8 minutes for everything):

    python benchmarks/train_gpu.py --budget-s 480            # JSON + table under $OUT

The number of epochs of each run is chosen from a short calibration so that its schedule
(cosine lr, and for v3 the momentum) completes within its share of the budget; a run that
would still overrun stops at an epoch boundary (logged as ``time_limit``). Images per second
count training images, i.e. pairs of views. The kNN monitor (k=200, T=0.1) uses the 60,000
training images as the bank and the 10,000 test images as queries, on backbone features.

On a CPU, with small settings, it doubles as a short real run (``--device cpu``); add
``--append-results`` to append the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.augment import BatchAugment
from training.config import preset
from training.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist
from training.loaders import DataOptions
from training.moco import build_moco
from training.optim import build_optimizer
from training.pretrain import RunOptions, train


def recipe(version: str, batch: int, epochs: int):
    """The preset of ``version`` for 32-px Fashion-MNIST. v2 takes the small-image settings of
    the MoCo CIFAR-10 demo (K=4096, m=0.99, T=0.1, wd 5e-4, 8 BN groups); v3 keeps its recipe
    with the warmup cut to a tenth of the run, as in its 100-epoch ResNet setting."""
    common = {"input_size": 32, "batch_size": batch, "epochs": epochs}
    if version == "v2":
        return preset(
            "v2",
            "resnet18",
            queue_size=4096,
            m=0.99,
            T=0.1,
            weight_decay=5e-4,
            shuffle_bn_groups=8,
            **common,
        )
    return preset("v3", "resnet18", warmup_epochs=max(0.5, epochs / 10), **common)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_rate(batch: int, device: torch.device, seconds: float) -> float:
    """Images/s of forward + backward + SGD step of the same backbone and a linear classifier,
    bf16 autocast and channels_last on GPU, on random 32-px inputs."""
    from mocoretrieval.backbones import build_backbone

    net = torch.nn.Sequential(build_backbone("resnet18", small_stem=True), torch.nn.Linear(512, 10))
    net = net.to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 5 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def augment_rate(batch: int, device: torch.device, images: torch.Tensor, seconds: float) -> float:
    """Images/s of the batched two-view augmentation alone (both views of a training image)."""
    cfg = recipe("v2", batch, 1)
    aug = [BatchAugment(cfg, v, FASHION_MNIST_MEAN, FASHION_MNIST_STD) for v in (0, 1)]
    x = images[:batch].to(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        aug[0](x), aug[1](x)
        n += 1
        if n % 5 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def step_seconds(version: str, batch: int, device: torch.device, steps: int) -> float:
    """Seconds per MoCo training step (calibration), bf16/channels_last on GPU."""
    cfg = recipe(version, batch, 10)
    model = build_moco(cfg).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    x = torch.randn(batch, 3, 32, 32, device=device)
    times = []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, x, 0.99)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_version(version: str, args, device, budget_s: float, out: Path, n_train: int) -> dict:
    t_step = step_seconds(version, args.batch_size, device, 5 if device.type == "cuda" else 2)
    steps = n_train // args.batch_size
    # kNN + checkpoint per epoch, guessed as 15% of an epoch, and a 25-s allowance for setup.
    epoch_s = steps * t_step * 1.15
    epochs = max(1, min(args.max_epochs, math.floor((budget_s - 25) / epoch_s)))
    cfg = recipe(version, args.batch_size, epochs)
    data = DataOptions(
        data="fashion-mnist",
        limit_train=args.limit_train,
        knn_bank=args.knn_bank,
        knn_val=args.knn_val,
        workers=0,
    )
    run = RunOptions(
        out_dir=str(out / version),
        device=str(device),
        log_every=100,
        export=True,
        time_limit_s=budget_s,
    )
    t0 = time.perf_counter()
    train(cfg, data, run)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / version / "log.jsonl").read_text().splitlines()]
    per_epoch = [
        {k: r.get(k) for k in ("epoch", "loss", "lr", "m", "images_per_s", "seconds", "knn_acc")}
        for r in records
        if r["event"] == "epoch"
    ]
    steady = [r["images_per_s"] for r in per_epoch[1:]] or [per_epoch[0]["images_per_s"]]
    return {
        "version": version,
        "planned_epochs": epochs,
        "epochs_run": len(per_epoch),
        "calibrated_step_s": t_step,
        "wall_s": wall,
        "images_per_s": sum(steady) / len(steady),
        "final_knn_acc": per_epoch[-1]["knn_acc"],
        "best_knn_acc": max((r["knn_acc"] or 0.0) for r in per_epoch),
        "per_epoch": per_epoch,
        "config": cfg.to_dict(),
    }


def table(result: dict) -> str:
    plain = result["plain_fwd_bwd_images_per_s"]
    lines = [
        (
            f"device: {result['device']}; batch {result['batch_size']}; train images "
            f"{result['train_images']}; kNN {result['knn']}"
        ),
        (
            f"plain forward/backward (ResNet-18 small stem, 32 px): {plain:,.0f} images/s; "
            f"batched two-view augmentation alone: {result['augment_images_per_s']:,.0f} images/s"
        ),
        "",
        "| run | epochs | images/s | / plain fwd+bwd | views/s / plain | final kNN | best kNN |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        ips = r["images_per_s"]
        lines.append(
            f"| MoCo {r['version']} | {r['epochs_run']} | {ips:,.1f} | {ips / plain:.2f} | "
            f"{2 * ips / plain:.2f} | {r['final_knn_acc']:.4f} | {r['best_knn_acc']:.4f} |"
        )
    lines.append("")
    for r in result["runs"]:
        accs = ", ".join(f"{e['knn_acc']:.4f}" for e in r["per_epoch"] if e["knn_acc"] is not None)
        lines.append(f"MoCo {r['version']} kNN accuracy per epoch: {accs}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget, all runs")
    p.add_argument("--versions", nargs="+", default=["v2", "v3"])
    p.add_argument("--v2-share", type=float, default=0.5, help="budget fraction for v2")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--knn-bank", type=int)
    p.add_argument("--knn-val", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/train_gpu"))
    p.add_argument("--append-results", action="store_true", help="append to RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, _ = fashion_mnist("train", limit=args.limit_train)
    probe = 20.0 if device.type == "cuda" else 5.0
    result = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "train_images": images.shape[0],
        "knn": f"bank {args.knn_bank or 60000} train / {args.knn_val or 10000} test queries",
        "plain_fwd_bwd_images_per_s": plain_rate(args.batch_size, device, probe / 2),
        "augment_images_per_s": augment_rate(args.batch_size, device, images, probe / 4),
        "runs": [],
    }
    for i, version in enumerate(args.versions):
        left = args.budget_s - (time.perf_counter() - start)
        share = left * (args.v2_share if version == "v2" and i + 1 < len(args.versions) else 1.0)
        if share < 60 and device.type == "cuda":
            result["runs_skipped"] = args.versions[i:]
            break
        result["runs"].append(run_version(version, args, device, share, out, images.shape[0]))
        (out / "train_gpu.json").write_text(json.dumps(result, indent=2))
    result["total_s"] = time.perf_counter() - start
    (out / "train_gpu.json").write_text(json.dumps(result, indent=2))
    text = table(result)
    (out / "train_gpu.md").write_text(text + "\n")
    print(text)
    if args.append_results:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(
                f"\n### training: MoCo on Fashion-MNIST ({result['device']})\n\n"
                f"`{result['command']}` ({result['total_s']:.0f} s)\n\n{text}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
