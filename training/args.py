"""Command-line options of `python -m training.pretrain`: run, data, and one ``--field`` per
:class:`~training.config.PretrainConfig` field on top of the ``--version``/``--arch`` preset."""

from __future__ import annotations

import argparse
import dataclasses

from .config import NAMED, PretrainConfig, named_preset, preset
from .loaders import DataOptions
from .runtime import PRECISIONS

_SKIP = {"extra"}


def field_type(annotation: str):
    """(type, item type) of a :class:`PretrainConfig` field's annotation: tuples as
    ("tuple", float | int), bool/int/float/str as themselves (optional or not)."""
    base = annotation.replace(" | None", "")
    if base.startswith("tuple"):
        return "tuple", float if "float" in base else int
    return {"int": int, "float": float, "str": str, "bool": bool}[base], None


def build_parser() -> argparse.ArgumentParser:
    """The CLI: run options, data options, and one ``--field`` per :class:`PretrainConfig`
    field, whose default comes from the ``--version``/``--arch`` preset."""
    p = argparse.ArgumentParser(
        prog="python -m training.pretrain",
        description="MoCo v1/v2/v3 pretraining. Every recipe field can be overridden; the "
        "rest come from the preset of --version and --arch (see training/config.py).",
    )
    p.add_argument("--out-dir", required=True, help="run folder: log, checkpoint, encoder")
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist' or a folder of unlabeled images (searched recursively)",
    )
    p.add_argument("--data-root", default=DataOptions.data_root, help="Fashion-MNIST IDX folder")
    p.add_argument("--val-dir", help="labeled folder (a sub-folder per class) for the kNN monitor")
    p.add_argument("--limit-train", type=int, help="train on the first N images only")
    p.add_argument("--knn-bank", type=int, help="Fashion-MNIST: N training images as kNN bank")
    p.add_argument("--knn-val", type=int, help="Fashion-MNIST: N test images as kNN queries")
    p.add_argument("--workers", type=int, default=8, help="data-loader processes (folders)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: GPU if available)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocast or fp32; auto: bf16 where the GPU or CPU computes it natively",
    )
    p.add_argument(
        "--preset",
        choices=sorted(NAMED),
        help="a named recipe (training/config.py NAMED); --version/--arch/--FIELD go on top",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue from a checkpoint (no value: OUT_DIR/checkpoint.pth)",
    )
    p.add_argument("--stop-after-epoch", type=int, help="leave after this epoch; resume later")
    p.add_argument(
        "--time-limit-s",
        type=float,
        help="leave at the epoch end after which another epoch would pass this many "
        "seconds; resume later",
    )
    p.add_argument(
        "--budget-min",
        type=float,
        help="plan the schedule into this many minutes, start to exported encoder: the number "
        "of epochs is set after every epoch to what still fits at the measured pace",
    )
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--no-export", action="store_true", help="do not write OUT_DIR/encoder")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the encoder at the end")
    recipe = p.add_argument_group("recipe (defaults from the preset)")
    for f in dataclasses.fields(PretrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, item = field_type(str(f.type))
        if kind is bool:
            recipe.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif kind == "tuple":
            recipe.add_argument(flag, type=item, nargs="+", default=None)
        else:
            recipe.add_argument(flag, type=kind, default=None)
    return p


def config_from_args(args: argparse.Namespace, fashion_mnist: bool) -> tuple[PretrainConfig, list]:
    """The preset of ``--version``/``--arch`` with every given ``--field`` on top."""
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(PretrainConfig)
        if f.name not in _SKIP and getattr(args, f.name, None) is not None
    }
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    explicit = list(overrides)
    if getattr(args, "preset", None):
        return named_preset(args.preset, overrides.pop("version", None), **overrides), explicit
    defaults = PretrainConfig.__dataclass_fields__
    version = overrides.pop("version", defaults["version"].default)
    arch = overrides.pop("arch", defaults["arch"].default)
    if fashion_mnist and "input_size" not in overrides:
        overrides["input_size"] = 32  # 28-px images, padded by resizing
    return preset(version, arch, **overrides), explicit
