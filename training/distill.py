"""`python -m training.distill TEACHER --data DIR --out-dir RUN`: copy invariance in one pass.

MoCo learns invariance to its augmentations, but not as tightly as duplicate detection needs:
a flipped or grayscale copy of a photo can land below the threshold that keeps two different
photos apart. Averaging the embeddings of an image's flip and grayscale versions (test-time
augmentation) is invariant to both by construction, at four forwards per image. This stage
fine-tunes a copy of the encoder (the student) so that one forward of an edited view of an
image, as the teacher was trained on, lands on the teacher's four-view average of the clean
image: the invariance of the average at the cost of one forward. The teacher is frozen and
the targets are fixed, so nothing can collapse; BatchNorm keeps the teacher's statistics.

A run writes ``targets.pt`` (computed once), ``distill.pth`` (each epoch; ``--resume``
continues from it), ``log.jsonl`` and, at the end, the student as ``encoder/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mocoretrieval.embed import available_cpus
from mocoretrieval.encoder import MoCoEncoder
from mocoretrieval.errors import CheckpointError, MoCoRetrievalError

from . import checkpoint as ckpt_io
from .augment import luma, pil_view_transform
from .config import ConfigError, PretrainConfig, preset
from .data import RobustImageDataset
from .export import write_encoder
from .runtime import autocast, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

VIEWS = ("identity", "flip", "gray", "gray-flip")
CHECKPOINT = "distill.pth"
TARGETS = "targets.pt"


@dataclasses.dataclass
class DistillConfig:
    """The recipe of a distillation run (the teacher's augmentations, crops of at least
    ``crop_min`` of the image, SGD with a cosine schedule)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.03
    momentum: float = 0.9
    crop_min: float = 0.5
    views: tuple[str, ...] = VIEWS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.views) - set(VIEWS)
        if unknown or not self.views:
            raise ConfigError(f"views are some of {', '.join(VIEWS)}; got {list(self.views)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 < self.crop_min <= 1:
            raise ConfigError(
                "epochs and batch size must be >= 1, lr > 0 and crop_min in (0, 1]; got "
                f"{self.epochs}, {self.batch_size}, {self.lr}, {self.crop_min}"
            )


def view(x: torch.Tensor, name: str, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One test-time view of a normalised (N, 3, H, W) batch: as is, mirrored, grayscale (ITU-R
    601 luma, as PIL's ``convert("L")``) or both."""
    if name.startswith("gray"):
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        rgb = x * s + m
        x = (luma(rgb).expand_as(rgb) - m) / s
    if name.endswith("flip"):
        x = torch.flip(x, dims=[3])
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def invariant_targets(
    encoder: MoCoEncoder, x: torch.Tensor, views: Sequence[str] = VIEWS
) -> torch.Tensor:
    """The L2-normalised mean of the encoder's normalised embeddings of ``views`` of ``x``.

    With both flips of every colour view it is exactly invariant to a horizontal flip of ``x``.
    """
    total = sum(
        F.normalize(encoder(view(x, v, encoder.mean, encoder.std)).float(), dim=1) for v in views
    )
    return F.normalize(total, dim=1)


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _augmentation(teacher: MoCoEncoder, crop_min: float) -> PretrainConfig:
    """The augmentations the teacher was trained with (a v2 recipe if it does not say), with
    crops of at least ``crop_min`` of the image."""
    recorded = (teacher.extra or {}).get("training_config")
    if recorded:
        cfg = PretrainConfig.from_dict(recorded)
    else:
        cfg = preset("v2", teacher.arch if teacher.is_resnet else "resnet50")
    return dataclasses.replace(cfg, input_size=teacher.input_size, crop_min=crop_min)


def compute_targets(
    teacher: MoCoEncoder,
    data: str | Path,
    views: Sequence[str],
    *,
    device: torch.device,
    precision: str,
    workers: int,
    batch_size: int = 128,
) -> tuple[list[str], torch.Tensor]:
    """The files under ``data`` and the teacher's invariant target of each (N, D), on the CPU.

    A file that fails to decode gets the target of the next one that does (as the training
    views do), so indices stay aligned.
    """
    pre = teacher.preprocess
    ds = RobustImageDataset(data, lambda img: pre.batch([img])[0], indexed=True)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(ds)))
    out = torch.zeros(len(ds), teacher.dim)
    teacher = teacher.to(device).eval()
    for idx, x in loader:
        with autocast(device, precision):
            out[idx] = invariant_targets(teacher, x.to(device), views).cpu()
    return ds.files, out


def _load_targets(path: Path, weights_hash: str, views: Sequence[str]) -> tuple | None:
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("teacher") != weights_hash or saved.get("views") != list(views):
        return None
    return saved["files"], saved["targets"]


def distill(
    teacher: str | Path | MoCoEncoder,
    data: str | Path,
    out_dir: str | Path,
    cfg: DistillConfig | None = None,
    *,
    resume: bool = False,
    device: str | None = None,
    precision: str = "auto",
    workers: int | None = None,
) -> MoCoEncoder:
    """Fine-tunes a copy of ``teacher`` on the images under ``data`` (see the module's text)
    and returns the student (float32, eval mode); :func:`training.export.write_encoder` saves
    it (the CLI writes ``out_dir/encoder``, or ``--save-to``).

    Args:
        teacher: an encoder, or a source of :meth:`MoCoEncoder.from_pretrained` (a name, a
            folder, a Hub id).
        resume: continue from ``out_dir/distill.pth``; without it an existing checkpoint is an
            error (nothing is overwritten).
    """
    cfg = cfg or DistillConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = str(teacher) if not isinstance(teacher, MoCoEncoder) else teacher.source
    if not isinstance(teacher, MoCoEncoder):
        teacher = MoCoEncoder.from_pretrained(teacher)
    teacher = teacher.float().eval()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    workers = available_cpus() if workers is None else workers
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise CheckpointError(
            f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out-dir"
        )
    teacher_hash = teacher.weights_hash()

    cached = _load_targets(out / TARGETS, teacher_hash, cfg.views)
    if cached is None:
        start = time.perf_counter()
        cached = compute_targets(
            teacher, data, cfg.views, device=dev, precision=prec, workers=workers
        )
        ckpt_io.save_atomic(
            {
                "teacher": teacher_hash,
                "views": list(cfg.views),
                "files": cached[0],
                "targets": cached[1],
            },
            out / TARGETS,
        )
        logger.info("targets of %d images in %.0f s", len(cached[0]), time.perf_counter() - start)
    files, targets = cached

    aug = _augmentation(teacher, cfg.crop_min)
    ds = RobustImageDataset(
        data,
        pil_view_transform(aug, 0, teacher.mean, teacher.std),
        indexed=True,
        min_side=math.ceil(aug.input_size / math.sqrt(cfg.crop_min)),
    )
    if ds.files != files:
        raise MoCoRetrievalError(
            f"the images under {data} changed since {out / TARGETS} was written; delete it (and "
            f"{ckpt_path}) to start again on the new set"
        )
    steps_per_epoch = len(ds) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(ds)} images make no batch of {cfg.batch_size}; lower --batch-size")

    student = copy.deepcopy(teacher).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    epoch = 0
    if ckpt_path.exists():
        state = ckpt_io.load(ckpt_path)
        if state.get("teacher") != teacher_hash or state.get("config") != dataclasses.asdict(cfg):
            raise CheckpointError(
                f"{ckpt_path} was written for another teacher or recipe; use its own, or "
                "another --out-dir"
            )
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        epoch = state["epoch"]
        ckpt_io.set_rng_state(state["rng"])
        logger.info("resuming after epoch %d of %d", epoch, cfg.epochs)
    else:
        ckpt_io.seed_all(cfg.seed)

    total = cfg.epochs * steps_per_epoch
    targets = targets.to(dev)
    with open(out / "log.jsonl", "a") as log:
        while epoch < cfg.epochs:
            student.train()
            _freeze_batchnorm(student)
            start = time.perf_counter()
            loader = DataLoader(
                ds,
                batch_size=cfg.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=min(workers, len(ds)),
                generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
            )
            losses = []
            for i, (idx, x) in enumerate(loader):
                step = epoch * steps_per_epoch + i
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                with autocast(dev, prec):
                    z = student(x.to(dev).contiguous(memory_format=torch.channels_last))
                cos = (F.normalize(z.float(), dim=1) * targets[idx.to(dev)]).sum(1)
                loss = (1 - cos).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            epoch += 1
            mean_loss = float(torch.stack(losses).mean())
            record = {"epoch": epoch, "loss": mean_loss, "seconds": time.perf_counter() - start}
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info(
                "epoch %d/%d: loss %.4f (%.0f s)", epoch, cfg.epochs, mean_loss, record["seconds"]
            )
            ckpt_io.save_atomic(
                {
                    "format": ckpt_io.FORMAT,
                    "teacher": teacher_hash,
                    "config": dataclasses.asdict(cfg),
                    "epoch": epoch,
                    "student": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": ckpt_io.rng_state(),
                },
                ckpt_path,
            )
    student = student.cpu().float().eval().to(memory_format=torch.contiguous_format)
    record = {
        **dataclasses.asdict(cfg),
        "teacher": source,
        "teacher_hash": teacher_hash,
        "images": len(ds),
    }
    student.extra = {**(teacher.extra or {}), "distilled": record}
    student.source = f"mocoretrieval training.distill ({cfg.epochs} epochs from {source})"
    return student


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.distill",
        description="Fine-tune an encoder so that one forward of an edited view matches its "
        "flip- and grayscale-averaged embedding of the clean image (copy invariance).",
    )
    p.add_argument("teacher", help="the encoder: a model name, an encoder folder or a Hub id")
    p.add_argument("--data", required=True, help="folder of training images")
    p.add_argument("--out-dir", required=True, help="run folder (checkpoint, log, encoder/)")
    d = DistillConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--crop-min",
        type=float,
        default=d.crop_min,
        help="smallest crop, as a fraction of the image's area",
    )
    p.add_argument(
        "--views",
        default=",".join(d.views),
        help=f"test-time views the target averages (of {', '.join(VIEWS)})",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/distill.pth")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU if there is one)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--workers", type=int, help="decoding processes (default: the CPUs)")
    p.add_argument("--save-to", metavar="DIR", help="where to write the student (OUT_DIR/encoder)")
    p.add_argument("--half", action="store_true", help="store the encoder's weights as float16")
    p.add_argument("--card", metavar="MD", help="Markdown appended to the model card")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = DistillConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            crop_min=args.crop_min,
            views=tuple(v.strip() for v in args.views.split(",") if v.strip()),
            seed=args.seed,
        )
        student = distill(
            args.teacher,
            args.data,
            args.out_dir,
            cfg,
            resume=args.resume,
            device=args.device,
            precision=args.precision,
            workers=args.workers,
        )
        target = Path(args.save_to or Path(args.out_dir) / "encoder")
        write_encoder(student, target, half=args.half, card=args.card)
    except MoCoRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved the student to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
