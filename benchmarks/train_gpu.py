"""MoCo v2 then v3 pretraining on Fashion-MNIST (ResNet-18, small stem; ``--set arch=`` for
another backbone): throughput and kNN accuracy per epoch, against the plain forward/backward
rate of the same backbone, in one run.

Prepared for one GPU within a fixed wall-clock budget (default 8 minutes for everything),
reading the Fashion-MNIST IDX files from a git-ignored folder carried to the machine:

    python benchmarks/train_gpu.py --data-root data/fashion-mnist --budget-s 480

Only small files land in ``--out`` ($OUT on the device machine): train_gpu.json, train_gpu.md
and each run's log.jsonl; checkpoints and exported encoders go to ``--work-dir`` (a temporary
folder by default), so nothing large is sent back.

Each run trains epoch 0 under a provisional plan (from a calibrated step time), resumes for
epoch 1 (a steady epoch: cuDNN's algorithm search is behind it), and from the measured parts
(that epoch, a kNN evaluation, a checkpoint, a resume's setup) plans how many epochs fit its
share of the budget: the checkpoint's schedule is set to that many epochs and the run resumes
under a time limit (v1/v2 set the lr per epoch, so only epoch 1's lr came from the provisional
plan; v3's warmup in epochs 0-1 did). A run that would still overrun stops at an epoch boundary
(logged as ``time_limit``), and then its last epoch may have no kNN (headline "n/a"). Images per
second count training images, i.e. pairs of views. The kNN monitor (k=200, T=0.1) uses the
60,000 training images as the bank and the 10,000 test images as queries, on backbone
features, about five times per run and after the last epoch; the headline is the last epoch's
accuracy, not the best.

On a CPU, with small settings, it doubles as a short real run (``--device cpu``); add
``--append-results`` to append the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from training import pretrain as pretrain_mod
from training.args import field_type
from training.augment import BatchAugment
from training.config import NAMED, PretrainConfig, preset
from training.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist
from training.loaders import DataOptions
from training.moco import build_moco
from training.optim import build_optimizer
from training.pretrain import RunOptions, train


def recipe(version: str, batch: int, epochs: int, **overrides):
    """The recipe of ``version`` for 32-px Fashion-MNIST: the ``fmnist-cpu`` preset's row for
    that version (v2: K=4096, m=0.99, T=0.2, BN in the projection head, wd 5e-4, base lr 0.06,
    crops of at least 40%, solarize at p=0.2 and brightness/contrast jitter of 0.8 on both
    views; its CPU probes are in RESULTS.md) with the small stem, which a GPU affords; v3 keeps
    its recipe with the warmup cut to a tenth of the run, as in its 100-epoch ResNet setting.
    ``overrides`` (``--set``) go on top of both."""
    # The small stem (3x3/1, no max-pool) at 32 px: 16x the compute of the standard stem, for
    # the higher accuracy of the MoCo CIFAR demo's network.
    common = {"input_size": 32, "batch_size": batch, "epochs": epochs, "small_stem": True}
    common["knn_every"] = max(1, epochs // 5)
    # ResNet-18, the network of the GPU runs so far, unless --set arch=... (the CPU preset's v2
    # row trains a ResNet-10 with the standard stem).
    overrides = {"arch": "resnet18", **overrides}
    if version == "v2":
        row = {k: v for k, v in NAMED["fmnist-cpu"]["v2"].items() if k not in common}
        fields = {**row, **common, **overrides}
        return preset("v2", fields.pop("arch"), **fields)
    fields = {"warmup_epochs": max(0.5, epochs / 10), **common, **overrides}
    return preset("v3", fields.pop("arch"), **fields)


PLANNED = ("epochs", "batch_size", "knn_every")  # the script's own, not --set's


def parse_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of a :class:`PretrainConfig` field (tuples comma-separated)."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    if not sep or name not in fields or name == "extra":
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a recipe field, got {text!r}")
    if name in PLANNED:
        raise argparse.ArgumentTypeError(
            f"{name} is set by the script (--batch-size; epochs and kNN from the budget)"
        )
    kind, item = field_type(str(fields[name].type))
    if kind is bool:
        flag = {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
        if flag is None:
            raise argparse.ArgumentTypeError(f"{name} takes true or false, got {value!r}")
        return name, flag
    if kind == "tuple":
        return name, tuple(item(v) for v in value.split(","))
    return name, kind(value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_rate(batch: int, device: torch.device, seconds: float, arch: str = "resnet18") -> float:
    """Images/s of forward + backward + SGD step of the same backbone and a linear classifier,
    bf16 autocast and channels_last on GPU, on random 32-px inputs."""
    from mocoretrieval.backbones import build_backbone, feature_dim

    net = torch.nn.Sequential(
        build_backbone(arch, small_stem=True), torch.nn.Linear(feature_dim(arch), 10)
    )
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


def augment_rate(
    batch: int, device: torch.device, images: torch.Tensor, seconds: float, overrides: dict
) -> float:
    """Images/s of the batched two-view augmentation alone (both views of a training image)."""
    cfg = recipe("v2", batch, 1, **overrides)
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


def step_seconds(
    version: str, batch: int, device: torch.device, steps: int, overrides: dict
) -> float:
    """Seconds per MoCo training step (calibration), bf16/channels_last on GPU."""
    cfg = recipe(version, batch, 10, **overrides)
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


TIMED_PARTS = {"epoch": "train_one_epoch", "knn": "evaluate", "checkpoint": "save_checkpoint"}


class PartTimes:
    """Wall seconds of the trainer's parts (an epoch's steps, a kNN evaluation, a checkpoint),
    recorded by wrapping ``training.pretrain``'s functions for the length of a run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {part: [] for part in TIMED_PARTS}
        self.saved = {name: getattr(pretrain_mod, name) for name in TIMED_PARTS.values()}

    def __enter__(self) -> PartTimes:  # noqa: PYI034
        for part, name in TIMED_PARTS.items():
            setattr(pretrain_mod, name, self._timed(part, self.saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(pretrain_mod, name, fn)

    def _timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            sync(self.device)
            if part != "knn" or result:  # evaluate() returns {} when no kNN is due
                self.seconds[part].append(time.perf_counter() - t0)
            return result

        return wrapper


def run_version(
    version: str, args, device, budget_s: float, out: Path, work: Path, n_train: int
) -> dict:
    """Trains ``version`` within ``budget_s``: epoch 0 under a provisional plan, epoch 1
    resumed (a steady epoch, measured), then the rest of a schedule planned from the measured
    parts, resumed under a time limit."""
    overrides = dict(args.set)
    t_step = step_seconds(
        version, args.batch_size, device, 5 if device.type == "cuda" else 2, overrides
    )
    steps = n_train // args.batch_size
    # The provisional plan, from the step time (kNN + checkpoint guessed at 15% of an epoch and
    # 25 s of setup), sets only epoch 1's lr (v2) or the first epochs' warmup (v3).
    guess = max(2, min(args.max_epochs, math.floor((budget_s - 25) / (steps * t_step * 1.15))))
    data = DataOptions(
        data="fashion-mnist",
        data_root=args.data_root,
        limit_train=args.limit_train,
        knn_bank=args.knn_bank,
        knn_val=args.knn_val,
        workers=0,
    )
    run_dir = work / version
    checkpoint = run_dir / ckpt_io.CHECKPOINT_NAME

    def options(**kw) -> RunOptions:
        return RunOptions(out_dir=str(run_dir), device=str(device), log_every=100, **kw)

    def keep_log() -> None:  # into --out after every stage, so a killed run leaves its curve
        (out / f"{version}.log.jsonl").write_text((run_dir / "log.jsonl").read_text())

    t0 = time.perf_counter()
    with PartTimes(device) as parts:
        provisional = recipe(version, args.batch_size, guess, **overrides)
        train(provisional, data, options(stop_after_epoch=1))
        keep_log()
        train(provisional, data, options(resume="auto", stop_after_epoch=2))
        keep_log()
        # What each further epoch costs (the steady second epoch and a checkpoint), the kNN
        # evaluations of the plan (~5 and the last) and one more resume's setup.
        epoch_s = parts.seconds["epoch"][-1] + max(parts.seconds["checkpoint"])
        knn_s = max(parts.seconds["knn"])
        setup_s = (time.perf_counter() - t0 - sum(map(sum, parts.seconds.values()))) / 2
        left = budget_s - (time.perf_counter() - t0)
        done = len(parts.seconds["epoch"])
        more = math.floor((left - setup_s - 6 * knn_s) / epoch_s)
        epochs = max(done, min(args.max_epochs, done + more))
        cfg = recipe(version, args.batch_size, epochs, **overrides)
        if epochs > done:
            replan(checkpoint, cfg)
            left = budget_s - (time.perf_counter() - t0)
            train(cfg, data, options(resume="auto", time_limit_s=left))
            keep_log()
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    per_epoch = [
        {k: r.get(k) for k in ("epoch", "loss", "lr", "m", "images_per_s", "seconds", "knn_acc")}
        for r in records
        if r["event"] == "epoch"
    ]
    steady = [r["images_per_s"] for r in per_epoch[1:]] or [per_epoch[0]["images_per_s"]]
    last = per_epoch[-1]
    return {
        "version": version,
        "planned_epochs": epochs,
        "plan": {"epoch_s": epoch_s, "knn_s": knn_s, "setup_s": setup_s, "first_epochs": done},
        "epochs_run": len(per_epoch),
        "calibrated_step_s": t_step,
        "wall_s": wall,
        "images_per_s": sum(steady) / len(steady),
        # The headline: the last epoch's kNN, None if the run stopped before evaluating it.
        "final_knn_acc": last["knn_acc"],
        "last_evaluated_knn_acc": next(
            (r["knn_acc"] for r in reversed(per_epoch) if r["knn_acc"] is not None), None
        ),
        "random_init_knn_acc": next(
            (r["knn_acc"] for r in records if r["event"] == "knn" and r["epoch"] == 0), None
        ),
        "pixels_knn_acc": next(
            (r.get("pixels_knn_acc") for r in records if r["event"] == "knn"), None
        ),
        "best_knn_acc": max((r["knn_acc"] or 0.0) for r in per_epoch),
        "per_epoch": per_epoch,
        "config": cfg.to_dict(),
    }


def table(result: dict) -> str:
    plain = result["plain_fwd_bwd_images_per_s"]

    def acc(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    headline = "; ".join(
        f"MoCo {r['version']} final-epoch kNN {acc(r['final_knn_acc'])} after "
        f"{r['epochs_run']} epochs in {r['wall_s']:.0f} s (random init "
        f"{acc(r['random_init_knn_acc'])}, raw pixels {acc(r['pixels_knn_acc'])})"
        for r in result["runs"]
    )
    lines = [
        f"**{headline}**",
        "",
        (
            f"device: {result['device']}; batch {result['batch_size']}; train images "
            f"{result['train_images']}; kNN {result['knn']}"
            + "".join(f"; {k}={v}" for k, v in result.get("overrides", {}).items())
        ),
        (
            f"plain forward/backward ({result['arch']} small stem, 32 px): {plain:,.0f} images/s; "
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
            f"{2 * ips / plain:.2f} | {acc(r['final_knn_acc'])} | {acc(r['best_knn_acc'])} |"
        )
    lines.append("")
    for r in result["runs"]:
        accs = ", ".join(
            f"{e['epoch'] + 1}: {e['knn_acc']:.4f}"
            for e in r["per_epoch"]
            if e["knn_acc"] is not None
        )
        lines.append(
            f"MoCo {r['version']} kNN accuracy after epoch (0: {acc(r['random_init_knn_acc'])}) "
            f"{accs}"
        )
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
    p.add_argument(
        "--set",
        type=parse_override,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a recipe field on top of both versions' recipes, e.g. blur_p=0,0 (repeatable)",
    )
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
    arch = recipe("v2", args.batch_size, 1, **dict(args.set)).arch  # the runs' network
    result = {
        "command": "python " + shlex.join(sys.argv),
        "arch": arch,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in args.set},
        "train_images": images.shape[0],
        "knn": f"bank {args.knn_bank or 60000} train / {args.knn_val or 10000} test queries",
        "plain_fwd_bwd_images_per_s": plain_rate(args.batch_size, device, probe / 2, arch),
        "augment_images_per_s": augment_rate(
            args.batch_size, device, images, probe / 4, dict(args.set)
        ),
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
