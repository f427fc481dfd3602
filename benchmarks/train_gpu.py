"""MoCo v2 then v3 pretraining on Fashion-MNIST (ResNet-18, small stem): throughput and kNN
accuracy per epoch, against the plain forward/backward rate of the same backbone, in one run.

Prepared for one GPU within a fixed wall-clock budget (default 8 minutes for everything),
reading the Fashion-MNIST IDX files from a git-ignored folder carried to the machine:

    python benchmarks/train_gpu.py --data-root data/fashion-mnist --budget-s 480

Only small files land in ``--out`` ($OUT on the device machine): train_gpu.json, train_gpu.md
and each run's log.jsonl; checkpoints and exported encoders go to ``--work-dir`` (a temporary
folder by default), so nothing large is sent back.

Each run first trains one epoch, measures it (kNN and checkpoint included), and from that plans
how many epochs fit its share of the budget: the checkpoint's schedule is set to that many
epochs and the run resumes (v1/v2 set the lr per epoch, so epoch 0 is what it would have been;
v3's warmup in epoch 0 used the provisional plan). A run that would still overrun stops at an
epoch boundary (logged as ``time_limit``). Images per second count training images, i.e. pairs
of views. The kNN monitor (k=200, T=0.1) uses the 60,000 training images as the bank and the
10,000 test images as queries, on backbone features, about five times per run and after the
last epoch; the headline is the last epoch's accuracy, not the best.

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
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import checkpoint as ckpt_io
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
    # The small stem (3x3/1, no max-pool) at 32 px: 16x the compute of the standard stem,
    # which a GPU affords, for the higher accuracy of the MoCo CIFAR demo's network.
    common = {"input_size": 32, "batch_size": batch, "epochs": epochs, "small_stem": True}
    common["knn_every"] = max(1, epochs // 5)
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


def replan(checkpoint: Path, cfg) -> None:
    """Sets the schedule of a saved run to ``cfg`` (its planned number of epochs)."""
    state = ckpt_io.load(checkpoint)
    state["config"] = cfg.to_dict()
    ckpt_io.save_atomic(state, checkpoint)


def run_version(
    version: str, args, device, budget_s: float, out: Path, work: Path, n_train: int
) -> dict:
    t_step = step_seconds(version, args.batch_size, device, 5 if device.type == "cuda" else 2)
    steps = n_train // args.batch_size
    # A provisional plan from the step time (kNN + checkpoint guessed at 15% of an epoch and
    # 25 s of setup), for the first epoch's warmup only; the measured epoch decides.
    guess = max(1, min(args.max_epochs, math.floor((budget_s - 25) / (steps * t_step * 1.15))))
    data = DataOptions(
        data="fashion-mnist",
        data_root=args.data_root,
        limit_train=args.limit_train,
        knn_bank=args.knn_bank,
        knn_val=args.knn_val,
        workers=0,
    )
    run_dir = work / version

    def options(**kw) -> RunOptions:
        return RunOptions(out_dir=str(run_dir), device=str(device), log_every=100, **kw)

    t0 = time.perf_counter()
    train(recipe(version, args.batch_size, max(guess, 2)), data, options(stop_after_epoch=1))
    first = time.perf_counter() - t0  # setup, one epoch, its kNN and checkpoint
    epochs = max(1, min(args.max_epochs, math.floor(budget_s / first)))
    cfg = recipe(version, args.batch_size, epochs)
    if epochs > 1:
        replan(run_dir / ckpt_io.CHECKPOINT_NAME, cfg)
        left = budget_s - (time.perf_counter() - t0)
        train(cfg, data, options(resume="auto", time_limit_s=left))
    wall = time.perf_counter() - t0
    log = (run_dir / "log.jsonl").read_text()
    (out / f"{version}.log.jsonl").write_text(log)
    records = [json.loads(line) for line in log.splitlines()]
    per_epoch = [
        {k: r.get(k) for k in ("epoch", "loss", "lr", "m", "images_per_s", "seconds", "knn_acc")}
        for r in records
        if r["event"] == "epoch"
    ]
    steady = [r["images_per_s"] for r in per_epoch[1:]] or [per_epoch[0]["images_per_s"]]
    return {
        "version": version,
        "planned_epochs": epochs,
        "first_epoch_s": first,
        "epochs_run": len(per_epoch),
        "calibrated_step_s": t_step,
        "wall_s": wall,
        "images_per_s": sum(steady) / len(steady),
        "final_knn_acc": next(
            (r["knn_acc"] for r in reversed(per_epoch) if r["knn_acc"] is not None), None
        ),
        "random_init_knn_acc": next(
            (r["knn_acc"] for r in records if r["event"] == "knn" and r["epoch"] == 0), None
        ),
        "best_knn_acc": max((r["knn_acc"] or 0.0) for r in per_epoch),
        "per_epoch": per_epoch,
        "config": cfg.to_dict(),
    }


def table(result: dict) -> str:
    plain = result["plain_fwd_bwd_images_per_s"]
    headline = "; ".join(
        f"MoCo {r['version']} final-epoch kNN {r['final_knn_acc']:.4f} after {r['epochs_run']} "
        f"epochs (random init {r['random_init_knn_acc'] or 0:.4f})"
        for r in result["runs"]
        if r["final_knn_acc"] is not None
    )
    lines = [
        f"**{headline}**",
        "",
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
    p.add_argument("--data-root", default=DataOptions.data_root, help="Fashion-MNIST IDX folder")
    p.add_argument("--limit-train", type=int)
    p.add_argument("--knn-bank", type=int)
    p.add_argument("--knn-val", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/train_gpu"), help="small files")
    p.add_argument("--work-dir", help="checkpoints and encoders (default: a temporary folder)")
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
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="train_gpu-"))
    images, _ = fashion_mnist("train", args.data_root, limit=args.limit_train)
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
        result["runs"].append(run_version(version, args, device, share, out, work, images.shape[0]))
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
