"""`python -m training.pretrain`: MoCo v1/v2/v3 pretraining on one device or under torchrun.

One process trains on the CPU or one GPU; ``torchrun --nproc_per_node N -m training.pretrain``
trains with DDP (NCCL on GPUs, gloo on CPUs). Rank 0 logs JSON lines (stdout and
``OUT_DIR/log.jsonl``), writes ``OUT_DIR/checkpoint.pth`` atomically after every epoch, and at
the end exports the base encoder to ``OUT_DIR/encoder`` (``MoCoEncoder.save_pretrained``).

Read top-down as moco-v3's ``main_moco.py``: :func:`setup` (build, resume, DDP), then per epoch
:func:`train_one_epoch`, :func:`evaluate` (kNN) and :func:`save_checkpoint`, and at the end
:func:`export_encoder`; :func:`train` only strings them together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocoretrieval.backbones import ResNetBackbone
from mocoretrieval.errors import MoCoRetrievalError

from . import checkpoint as ckpt_io
from . import dist
from .args import build_parser, config_from_args
from .config import ConfigError, PretrainConfig
from .data import EpochSampler
from .knn import extract, knn_accuracy
from .loaders import DataOptions, KnnSets, build_knn, build_train, normalization
from .moco import build_moco
from .optim import build_optimizer
from .runtime import autocast, resolve_device, resolve_precision, set_cpu_threads
from .schedules import learning_rate, momentum

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunOptions:
    """Where a run writes and how it runs (not part of the recipe)."""

    out_dir: str = "runs/moco"
    device: str | None = None  # default: this process's GPU if there is one, else the CPU
    # "auto": bf16 autocast where the device computes bf16 natively (GPUs, CPUs with AVX-512
    # BF16 or AMX), else fp32. The contrastive loss is always computed in fp32.
    precision: str = "auto"
    resume: str | None = None  # checkpoint to continue from ("auto": OUT_DIR's, if any)
    stop_after_epoch: int | None = None  # leave after this epoch (a job slot ends), resumable
    # Leave after the epoch at which one more epoch would overrun this many seconds of the
    # run (resumable): for fixed time slots and benchmarks.
    time_limit_s: float | None = None
    # Plan the schedule into this many seconds of wall time, from the start of this call to
    # the exported encoder: after every epoch the number of epochs is set to what still fits
    # at the epochs' measured pace (the recipe's ``epochs`` only shapes the first epoch's lr).
    budget_s: float | None = None
    log_every: int = 50  # steps between step log lines
    export: bool = True  # write OUT_DIR/encoder at the end
    push_to_hub: str | None = None  # and upload it to this Hub repo id


class JsonLog:
    """Rank 0's JSON-lines log: ``OUT_DIR/log.jsonl`` and the ``training.pretrain`` logger."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, **record: Any) -> None:
        if self.path is None:
            return
        line = json.dumps(
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        )
        with open(self.path, "a") as f:
            f.write(line + "\n")
        logger.info(line)


def evaluate_knn(
    backbone: nn.Module, sets: KnnSets, cfg: PretrainConfig, device: torch.device, precision: str
) -> float:
    """kNN top-1 accuracy of the backbone's features on the labeled sets."""
    use_bf16 = precision == "bf16"
    fmt = torch.channels_last if isinstance(backbone, ResNetBackbone) else None
    queries = extract(backbone, sets.queries, device, use_bf16, fmt)
    if sets.bank is None:
        return knn_accuracy(queries, sets.query_labels, k=cfg.knn_k, t=cfg.knn_t)
    bank = extract(backbone, sets.bank, device, use_bf16, fmt)
    return knn_accuracy(queries, sets.query_labels, bank, sets.bank_labels, cfg.knn_k, cfg.knn_t)


def pixel_knn(sets: KnnSets, cfg: PretrainConfig) -> float:
    """The same kNN protocol on raw pixels (L2-normalised), the floor a learned feature must
    beat: on Fashion-MNIST the 28x28 images in [0, 1], else the model's input pixels."""

    def flat(batches: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.cat([b.flatten(1) for b in batches]).float())

    queries = flat(sets.raw_queries or sets.queries)
    if sets.bank is None:
        return knn_accuracy(queries, sets.query_labels, k=cfg.knn_k, t=cfg.knn_t)
    bank = flat(sets.raw_bank or sets.bank)
    return knn_accuracy(queries, sets.query_labels, bank, sets.bank_labels, cfg.knn_k, cfg.knn_t)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x1: torch.Tensor,
    x2: torch.Tensor,
    lr: float,
    m: float,
    precision: str,
    channels_last: bool,
) -> torch.Tensor:
    """One optimisation step on a batch of view pairs; returns the detached loss (no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if channels_last:
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    with autocast(x1.device, precision):
        loss = model(x1, x2, m)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# --- setting a run up ----------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """A run once set up by :func:`setup`: the recipe, the model built (and resumed), what feeds
    it, and where it is. Plain state: the functions below read and advance it."""

    cfg: PretrainConfig
    device: torch.device
    precision: str
    rank: int
    world: int
    out: Path
    moco: nn.Module  # what is checkpointed, evaluated and exported
    model: nn.Module  # what is trained: ``moco``, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    source: Any  # yields the view pairs of an epoch (`loaders.build_train`)
    sampler: EpochSampler
    knn_sets: KnnSets | None  # rank 0 only, when the recipe evaluates kNN
    data_info: dict[str, Any]
    channels_last: bool
    log: JsonLog
    epoch: int = 0  # epochs done
    step: int = 0  # optimisation steps done
    knn_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resumed_from: Path | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / ckpt_io.CHECKPOINT_NAME


def _resume_point(out: Path, run: RunOptions) -> Path | None:
    """The checkpoint to continue from, if any; refuses to overwrite a run not asked to resume."""
    checkpoint = out / ckpt_io.CHECKPOINT_NAME
    if not run.resume and checkpoint.is_file():
        raise ConfigError(
            f"{out} already holds a run's checkpoint; pass --resume to continue it, or choose "
            "another --out-dir"
        )
    if run.resume == "auto":
        return checkpoint if checkpoint.is_file() else None
    return Path(run.resume) if run.resume else None


def _resumed_config(
    cfg: PretrainConfig, state: dict[str, Any], explicit: Sequence[str]
) -> PretrainConfig:
    """The checkpoint's recipe; the options the user set must agree with it."""
    saved = PretrainConfig.from_dict(state["config"])
    clash = [k for k in explicit if getattr(saved, k) != getattr(cfg, k)]
    if clash:
        raise ConfigError(
            f"--resume continues the checkpoint's recipe, but {', '.join(clash)} differ from "
            "it; drop those options or start a new run in another --out-dir"
        )
    return saved


def _check_batch(cfg: PretrainConfig, world: int) -> None:
    per_rank = cfg.batch_size // world
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide among {world} processes")
    splits = max(1, cfg.shuffle_bn_groups // world) if cfg.version != "v3" else 1
    if per_rank % splits:
        raise ConfigError(
            f"batch of {per_rank} per process does not split into {splits} "
            "shuffle-BN groups; change batch_size or shuffle_bn_groups"
        )


def _restore(t: Trainer, state: dict[str, Any]) -> None:
    """Continues from a checkpoint: weights, optimizer, data order, counters and RNG streams."""
    t.moco.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.sampler.load_state_dict(state["sampler"])
    t.epoch, t.step, t.knn_history = state["epoch"], state["step"], list(state["knn"])
    if len(state["rng"]) == t.world:
        ckpt_io.set_rng_state(state["rng"][t.rank])
    else:
        logger.warning(
            "checkpoint from %d processes, now %d: RNG streams start afresh",
            len(state["rng"]),
            t.world,
        )
        ckpt_io.seed_all(t.cfg.seed * 1000 + t.epoch * 10 + t.rank)


def _wrap_ddp(moco: nn.Module, cfg: PretrainConfig, device: torch.device) -> nn.Module:
    if cfg.sync_bn and device.type == "cuda":  # MoCo v3: BN statistics over all GPUs
        moco = nn.SyncBatchNorm.convert_sync_batchnorm(moco)
    elif cfg.sync_bn:
        logger.warning("SyncBN needs GPUs; on CPU each process normalises its own batch")
    return nn.parallel.DistributedDataParallel(
        moco, device_ids=[device.index] if device.type == "cuda" else None
    )


def setup(
    cfg: PretrainConfig, data: DataOptions, run: RunOptions, explicit: Sequence[str] = ()
) -> Trainer:
    """Joins the process group, builds model, optimizer and data, resumes from a checkpoint
    when asked, wraps the model in DDP under torchrun, and logs the start or the resume.

    Raises:
        ConfigError: a checkpoint is in the way, the resumed recipe clashes with ``explicit``
            options, or the batch does not split among processes and shuffle-BN groups.
    """
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    distributed = dist.init_from_env(device.type)
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = set_cpu_threads(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    out = Path(run.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    resume_from = _resume_point(out, run)
    state = ckpt_io.load(resume_from) if resume_from else None
    if state is not None:
        cfg = _resumed_config(cfg, state, explicit)
    _check_batch(cfg, world)

    ckpt_io.seed_all(cfg.seed)  # the same initial weights in every process
    mean, std = normalization(cfg, data)
    moco = build_moco(cfg, mean, std, world_size=world).to(device)
    # channels_last suits both cuDNN and oneDNN convolutions: a ResNet-18 forward+backward at
    # 32 px, batch 128, on 2 CPU cores ran at 549 vs 458 images/s in fp32, 929 vs 822 in bf16.
    channels_last = moco.base_encoder.is_resnet and device.type in ("cuda", "cpu")
    if channels_last:
        moco = moco.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, [p for p in moco.parameters() if p.requires_grad])
    source, data_info = build_train(cfg, data, device)
    t = Trainer(
        cfg=cfg,
        device=device,
        precision=precision,
        rank=rank,
        world=world,
        out=out,
        moco=moco,
        model=moco,
        optimizer=optimizer,
        source=source,
        sampler=EpochSampler(len(source), cfg.batch_size, rank, world, cfg.seed),
        knn_sets=build_knn(cfg, data, device) if rank == 0 and cfg.knn_every else None,
        data_info=data_info,
        channels_last=channels_last,
        log=JsonLog(out / "log.jsonl" if rank == 0 else None),
        resumed_from=resume_from,
    )
    if state is not None:
        _restore(t, state)
    else:
        ckpt_io.seed_all(cfg.seed + 1 + rank)  # each process draws its own augmentations
    if distributed:
        t.model = _wrap_ddp(moco, cfg, device)

    if state is None:
        t.log(
            event="start",
            world_size=world,
            device=str(device),
            precision=precision,
            threads=threads,
            data=data_info,
            config=cfg.to_dict(),
        )
    else:
        t.log(event="resume", epoch=t.epoch, step=t.step, checkpoint=str(resume_from))
    return t


# --- one epoch, evaluation, checkpoint, export ----------------------------------------------


def train_one_epoch(t: Trainer, epoch: int, log_every: int) -> dict[str, Any]:
    """Trains one epoch, logging every ``log_every`` steps; returns the epoch's log record.

    Raises:
        MoCoRetrievalError: the loss stopped being finite (seen at a step log line).
    """
    cfg, steps = t.cfg, len(t.sampler)
    t.sampler.set_epoch(epoch)
    t.model.train()
    loss_sum = torch.zeros((), device=t.device)
    tick = t0 = time.perf_counter()
    for i, (x1, x2) in enumerate(t.source.epoch(t.sampler, t.device)):
        progress = epoch + i / steps
        lr, m = learning_rate(cfg, progress), momentum(cfg, progress)
        loss = train_step(t.model, t.optimizer, x1, x2, lr, m, t.precision, t.channels_last)
        loss_sum += loss
        t.step += 1
        if log_every and t.step % log_every == 0:
            value = float(dist.all_reduce_mean(loss))
            now = time.perf_counter()
            t.log(
                event="step",
                epoch=epoch,
                step=t.step,
                loss=value,
                lr=lr,
                m=m,
                images_per_s=log_every * cfg.batch_size / (now - tick),
            )
            tick = now
            if not math.isfinite(value):
                raise MoCoRetrievalError(f"loss is {value} at step {t.step}; lower the lr")
    epoch_loss = float(dist.all_reduce_mean(loss_sum)) / steps
    elapsed = time.perf_counter() - t0
    return {
        "event": "epoch",
        "epoch": epoch,
        "step": t.step,
        "loss": epoch_loss,
        "lr": lr,
        "m": m,
        "images_per_s": steps * cfg.batch_size / elapsed,
        "seconds": elapsed,
    }


def evaluate(t: Trainer, epoch: int) -> dict[str, Any]:
    """kNN accuracy of the base encoder after ``epoch`` (0: before training, with the
    raw-pixel floor) when the recipe asks for it then; the fields it adds to the log record."""
    cfg, sets = t.cfg, t.knn_sets
    if sets is None or not (epoch == 0 or epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
        return {}
    if epoch == 0:  # the floors a learned feature must beat, in this very run
        pixels = pixel_knn(sets, cfg)
        acc = evaluate_knn(t.moco.base_encoder.backbone, sets, cfg, t.device, t.precision)
        t.knn_history.append({"epoch": 0, "knn_acc": acc, "pixels_knn_acc": pixels})
        return {"knn_acc": acc, "pixels_knn_acc": pixels, "knn_set": sets.name}
    acc = evaluate_knn(t.moco.base_encoder.backbone, sets, cfg, t.device, t.precision)
    t.knn_history.append({"epoch": epoch, "knn_acc": acc})
    return {"knn_acc": acc, "knn_set": sets.name}


def save_checkpoint(t: Trainer) -> None:
    """Writes ``OUT_DIR/checkpoint.pth`` (rank 0, atomically) with every process's RNG
    states and rank 0's kNN history. Collective: every process calls it."""
    t.knn_history = dist.all_gather_object(t.knn_history)[0]
    rngs = dist.all_gather_object(ckpt_io.rng_state())
    if t.rank != 0:
        return
    ckpt_io.save_atomic(
        {
            "format": ckpt_io.FORMAT,
            "config": t.cfg.to_dict(),
            "epoch": t.epoch,
            "step": t.step,
            "model": t.moco.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "sampler": t.sampler.state_dict(),
            "rng": rngs,
            "knn": t.knn_history,
            "encoder_config": t.moco.base_encoder.config.to_dict(),
            "data": t.data_info,
            "world_size": t.world,
        },
        t.checkpoint_path,
    )


def _out_of_time(run: RunOptions, run_start: float, epoch_start: float, now: float) -> bool:
    """Whether one more epoch, as long as the last, would overrun ``run.time_limit_s``; every
    process gets rank 0's answer."""
    late = run.time_limit_s is not None and (
        now - run_start + (now - epoch_start) > run.time_limit_s
    )
    return dist.all_gather_object(late)[0]


def plan_epochs(done: int, left_s: float, epoch_s: float, knn_s: float, knn_every: int) -> int:
    """The most epochs a run that has just trained its ``done``-th epoch can have such that the
    rest fit in ``left_s`` seconds: ``epoch_s`` per epoch and ``knn_s`` per kNN evaluation
    (after every ``knn_every``-th epoch, the ``done``-th included, and after the last; 0: none).
    At least ``done``."""

    def cost(total: int) -> float:
        evals = 0
        if knn_every:  # multiples of knn_every in [done, total], and the last epoch
            evals = total // knn_every - (done - 1) // knn_every + (total % knn_every != 0)
        return (total - done) * epoch_s + evals * knn_s

    total = done
    while total < PLAN_MAX_EPOCHS and cost(total + 1) <= left_s:
        total += 1
    return total


PLAN_MAX_EPOCHS = 10_000


class Pace:
    """What a budgeted run measures to plan with: its epochs' wall seconds (training and
    checkpoint) and its kNN evaluations'."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.knn: list[float] = []
        self.checkpoint_s = 0.0  # the last checkpoint's write

    def epoch_s(self) -> float:
        recent = self.epochs[-3:]  # the host's recent pace: follows a machine that slows down
        return sum(recent) / len(recent)

    def knn_s(self) -> float:
        # Before any evaluation was timed (a resumed run), a quarter of an epoch.
        return self.knn[-1] if self.knn else 0.25 * self.epoch_s()


def _replan(t: Trainer, run: RunOptions, pace: Pace, budget_start: float) -> None:
    """Sets ``t.cfg.epochs`` to what fits ``run.budget_s`` at ``pace`` (rank 0's plan for every
    process); logs a ``plan`` record when it changes."""
    left = run.budget_s - (time.monotonic() - budget_start) - EXPORT_RESERVE_S
    total = plan_epochs(t.epoch, left, pace.epoch_s(), pace.knn_s(), t.cfg.knn_every)
    total = dist.all_gather_object(total)[0]
    if total != t.cfg.epochs:
        t.cfg = dataclasses.replace(t.cfg, epochs=total)
        t.log(event="plan", epoch=t.epoch, epochs=total, epoch_s=round(pace.epoch_s(), 3))


EXPORT_RESERVE_S = 5.0  # writing the encoder and its card at the end of a budgeted run


def export_encoder(t: Trainer, push_to_hub: str | None) -> str:
    """Exports the checkpoint's base encoder to ``OUT_DIR/encoder`` (and the Hub)."""
    from .export import export

    path = t.out / "encoder"
    export(t.checkpoint_path, path, push_to_hub=push_to_hub)
    t.log(event="export", path=str(path), hub=push_to_hub)
    return str(path)


def train(
    cfg: PretrainConfig, data: DataOptions, run: RunOptions, explicit: Sequence[str] = ()
) -> dict[str, Any]:
    """Runs (or resumes) pretraining; returns a summary (epochs, kNN history, paths).

    Args:
        cfg: the recipe.
        data: where the images come from.
        run: where to write, and how to run.
        explicit: config fields the user set; on resume they must match the checkpoint's.
    """
    budget_start = time.monotonic()
    t = setup(cfg, data, run, explicit)
    pace = Pace()
    if t.resumed_from is None:
        knn_start = time.monotonic()
        floors = evaluate(t, 0)
        if floors:
            pace.knn.append(time.monotonic() - knn_start)
            t.log(event="knn", epoch=0, **floors)

    def last_epoch() -> int:  # the recipe's (the checkpoint's when resumed), or the plan's
        epochs = t.cfg.epochs
        return epochs if run.stop_after_epoch is None else min(epochs, run.stop_after_epoch)

    run_start = time.monotonic()
    while t.epoch < last_epoch():
        epoch, epoch_start = t.epoch, time.monotonic()
        record = train_one_epoch(t, epoch, run.log_every)
        t.epoch = epoch + 1
        if run.budget_s is not None:
            pace.epochs.append(time.monotonic() - epoch_start + pace.checkpoint_s)
            _replan(t, run, pace, budget_start)
        knn_start = time.monotonic()
        evaluated = evaluate(t, epoch + 1)
        if evaluated:
            pace.knn.append(time.monotonic() - knn_start)
        record.update(evaluated)
        save_start = time.monotonic()
        save_checkpoint(t)
        pace.checkpoint_s = time.monotonic() - save_start
        t.log(**record)
        now = time.monotonic()
        if _out_of_time(run, run_start, epoch_start, now) and t.epoch < last_epoch():
            t.log(event="time_limit", epoch=epoch, seconds=now - run_start)
            break
        dist.barrier()
    cfg = t.cfg

    summary: dict[str, Any] = {
        "epochs": t.epoch,
        "step": t.step,
        "knn": t.knn_history,
        "checkpoint": str(t.checkpoint_path),
    }
    if t.rank == 0 and run.export and t.epoch == cfg.epochs:
        summary["encoder"] = export_encoder(t, run.push_to_hub)
    t.log(event="end", epoch=t.epoch, seconds=time.monotonic() - budget_start)
    dist.barrier()
    return summary


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if dist.local_rank() == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
    )
    data = DataOptions(
        data=args.data,
        data_root=args.data_root,
        val_dir=args.val_dir,
        limit_train=args.limit_train,
        knn_bank=args.knn_bank,
        knn_val=args.knn_val,
        workers=args.workers,
    )
    run = RunOptions(
        out_dir=args.out_dir,
        device=args.device,
        precision=args.precision,
        resume=args.resume,
        stop_after_epoch=args.stop_after_epoch,
        time_limit_s=args.time_limit_s,
        budget_s=None if args.budget_min is None else 60.0 * args.budget_min,
        log_every=args.log_every,
        export=not args.no_export,
        push_to_hub=args.push_to_hub,
    )
    try:
        cfg, explicit = config_from_args(args, data.is_fashion_mnist)
        train(cfg, data, run, explicit)
    except MoCoRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
