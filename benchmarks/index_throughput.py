"""Indexing throughput on large real JPEGs: the pipeline against model-only and a naive loop.

Measures, in one run and on the same random-weight encoder and batch size:

- ``model-only``: forward passes on ready-made tensors (channels_last, inference mode): the
  ceiling any pipeline can reach;
- ``iter_embeddings``: files to vectors with :func:`mocoretrieval.embed.iter_embeddings`
  (draft-mode decoding in worker processes, overlapped with the model);
- ``cli index`` (with ``--cli``): ``mocoretrieval index`` as a user runs it, process start and
  model loading included; with ``--backend torch`` (the same model as the rows above) and with
  the default backend (onnxruntime on CPU, exported once before timing);
- ``decoding only``: ``iter_embeddings`` with a null encoder: the decoding pipeline alone;
- ``naive batched``: full PIL decode -> transform -> model (default layout, ``no_grad``), in
  one process, batched like the others;
- ``naive 1-by-1`` (with ``--naive-1``): the same one image at a time.

Methods are interleaved over ``--rounds`` rounds. Ratios are taken within each round, between
methods that ran seconds apart, and their median over rounds is reported, so that load from
other processes on a shared machine penalises both sides of a ratio alike; images/s is the best
round. CPU time (this process and its
children: workers, the CLI) is reported beside wall time: on a loaded machine it shows the work
each method does, which wall time there cannot. Usage::

    python benchmarks/index_throughput.py --folder /usr/share/wallpapers --limit 40
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results import append_section

from mocoretrieval import MoCoEncoder
from mocoretrieval.embed import available_cpus, iter_embeddings
from mocoretrieval.walk import walk_images


def pick_jpegs(
    folder: Path, limit: int, min_pixels: float, skip_progressive: bool = False
) -> list[str]:
    """The first ``limit`` JPEGs of at least ``min_pixels`` pixels, in walk order."""
    out = []
    for rel in walk_images(folder):
        if rel.lower().endswith((".jpg", ".jpeg")):
            with Image.open(folder / rel) as im:
                if im.width * im.height < min_pixels:
                    continue
                if skip_progressive and im.info.get("progressive"):
                    continue
                out.append(rel)
        if len(out) == limit:
            break
    return out


def describe(folder: Path, rel: list[str]) -> str:
    mpix, progressive = [], 0
    for r in rel:
        with Image.open(folder / r) as im:
            mpix.append(im.width * im.height / 1e6)
            progressive += bool(im.info.get("progressive"))
    return (
        f"{len(rel)} JPEGs, {min(mpix):.1f}-{max(mpix):.1f} MPix (median "
        f"{np.median(mpix):.1f}), {progressive} progressive"
    )


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (decoding workers, the CLI)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def run_model_only(encoder: MoCoEncoder, n: int, batch_size: int) -> None:
    x = torch.randn(batch_size, 3, encoder.input_size, encoder.input_size)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for size in chunks(n, batch_size):
            encoder.embed(x[:size])


def run_pipeline(
    encoder: MoCoEncoder, folder: Path, rel: list[str], args, batch_size: int | None = None
) -> None:
    done = sum(
        len(b.paths)
        for b in iter_embeddings(
            encoder,
            folder,
            rel,
            batch_size=batch_size or args.batch_size,
            workers=args.workers,
            device="cpu",
        )
    )
    if done != len(rel):
        raise RuntimeError(f"embedded {done} of {len(rel)} files")


class NullEncoder:
    """The embedding protocol without a model: what is left is the decoding pipeline."""

    is_resnet = False
    dim = 1

    def __init__(self, encoder: MoCoEncoder) -> None:
        self.preprocess, self.resize_size = encoder.preprocess, encoder.resize_size
        self.input_size = encoder.input_size

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return np.ones((len(batch), 1), dtype=np.float32)


def naive_transform(encoder: MoCoEncoder):
    """The transform as the MoCo repos and most users write it: torchvision, on the full image."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(encoder.resize_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(encoder.input_size),
            T.ToTensor(),
            T.Normalize(encoder.mean, encoder.std),
        ]
    )


def run_naive(encoder: MoCoEncoder, folder: Path, rel: list[str], batch_size: int) -> None:
    tf = naive_transform(encoder)
    with torch.no_grad():
        for i in range(0, len(rel), batch_size):
            batch = torch.stack(
                [tf(Image.open(folder / r).convert("RGB")) for r in rel[i : i + batch_size]]
            )
            torch.nn.functional.normalize(encoder(batch), dim=1).numpy()


def run_cli(
    model_dir: Path,
    folder: Path,
    rel: list[str],
    args,
    backend: str | None = None,
    batch_size: int | None = None,
) -> float:
    """Run `mocoretrieval index` on a fresh index; return the seconds its own summary reports.

    The summary times ``ImageIndex.update`` (walk, decode, embed, FAISS write): the command's
    steady state. Wall time minus that is the fixed cost of a run: interpreter start, imports,
    model loading, index creation.
    """
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        for r in rel:  # a folder of exactly these files, as links (walk_images lists links)
            (photos / r).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(folder / r, photos / r)
        cmd = [
            sys.executable, "-m", "mocoretrieval", "index", str(photos), "--index",
            str(Path(tmp) / "index"), "--model", str(model_dir), "--batch-size",
            str(batch_size or args.batch_size), "--device", "cpu", "--quiet",
        ]  # fmt: skip
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if backend is not None:
            cmd += ["--backend", backend]
        out = subprocess.run(
            cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        ).stdout
    m = re.search(r"added (\d+),.* in ([\d.]+) s \(", out)
    if m is None or int(m.group(1)) != len(rel):
        raise RuntimeError(f"unexpected summary from `mocoretrieval index`: {out!r}")
    return float(m.group(2))


def index_options() -> set[str]:
    """The options `mocoretrieval index` takes; empty when the command does not exist."""
    from mocoretrieval.cli import build_parser

    for action in build_parser()._subparsers._group_actions:
        if "index" in getattr(action, "choices", {}):
            return set(action.choices["index"]._option_string_actions)
    return set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/usr/share/wallpapers"))
    p.add_argument("--limit", type=int, default=40, help="number of JPEGs")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="link each JPEG this many times (distinct names): a library larger than the "
        "folder, over which the command's fixed start-up cost is spread as it is in real use",
    )
    p.add_argument("--min-mpix", type=float, default=2.0, help="skip JPEGs smaller than this")
    p.add_argument(
        "--skip-progressive",
        action="store_true",
        help="only baseline JPEGs (what cameras write; draft mode saves least on progressive)",
    )
    p.add_argument("--arch", default="resnet50")
    p.add_argument(
        "--model",
        metavar="SOURCE",
        help="time this encoder (alias, directory, ...) instead of random --arch weights",
    )
    p.add_argument(
        "--versus",
        metavar="ARCH",
        help="with --cli: also time `mocoretrieval index` (default backend) with random ARCH "
        "weights (e.g. resnet50), and print the rate of --model's over it, round by round",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--compare-batch",
        type=int,
        help="also time model-only, iter_embeddings and the --cli rows at this batch size",
    )
    p.add_argument(
        "--cli-backends",
        default="torch,default",
        help="with --cli: comma-separated backends to time (torch, default)",
    )
    p.add_argument("--workers", type=int, default=None, help="default: iter_embeddings' choice")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cli", action="store_true", help="also time `mocoretrieval index`")
    p.add_argument("--naive-1", action="store_true", help="also time the 1-by-1 naive loop (slow)")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="METHOD",
        help="a method not to time, e.g. 'naive batched'; repeatable (model-only and "
        "iter_embeddings always run: the ratios are taken against them)",
    )
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    rel = pick_jpegs(args.folder, args.limit, args.min_mpix * 1e6, args.skip_progressive)
    if not rel:
        p.error(f"no JPEG of at least {args.min_mpix} MPix under {args.folder}")
    source_folder, linked = args.folder, None
    if args.repeat > 1:
        linked = Path(tempfile.mkdtemp(prefix="repeat-"))
        for i in range(args.repeat):
            for r in rel:
                (linked / f"copy{i}" / r).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(args.folder / r, linked / f"copy{i}" / r)
        rel = [f"copy{i}/{r}" for i in range(args.repeat) for r in rel]
        args.folder = linked
    n = len(rel)
    torch.manual_seed(0)
    if args.model:
        encoder = MoCoEncoder.from_pretrained(args.model)
        args.arch = f"{args.model} ({encoder.arch}, {encoder.input_size} px, trained weights)"
    else:
        encoder = MoCoEncoder(arch=args.arch)  # random weights: speed does not depend on them
    naive_encoder = copy.deepcopy(encoder)  # stays in the default (NCHW) layout
    methods: dict[str, Callable[[], float | None]] = {
        "model-only": lambda: run_model_only(encoder, n, args.batch_size),
        "iter_embeddings": lambda: run_pipeline(encoder, args.folder, rel, args),
        "naive batched": lambda: run_naive(naive_encoder, args.folder, rel, args.batch_size),
        "decoding only": lambda: run_pipeline(NullEncoder(encoder), args.folder, rel, args),
    }
    b2 = args.compare_batch
    if b2:
        methods[f"model-only, batch {b2}"] = lambda: run_model_only(encoder, n, b2)
        methods[f"iter_embeddings, batch {b2}"] = lambda: run_pipeline(
            encoder, args.folder, rel, args, b2
        )
    if args.naive_1:
        methods["naive 1-by-1"] = lambda: run_naive(naive_encoder, args.folder, rel, 1)
    model_dir = None
    if args.cli:
        options = index_options()
        if not options:
            p.error("`mocoretrieval index` does not exist yet; run without --cli")
        model_dir = Path(tempfile.mkdtemp())
        encoder.save_pretrained(model_dir)
        backends = args.cli_backends.split(",")
        if "--backend" in options:  # the same torch model as the rows above, then the default
            if "torch" in backends:
                methods["cli index, torch"] = lambda: run_cli(
                    model_dir, args.folder, rel, args, "torch"
                )
                if b2:
                    methods[f"cli index, torch, batch {b2}"] = lambda: run_cli(
                        model_dir, args.folder, rel, args, "torch", b2
                    )
            if "default" in backends:
                methods["cli index, default"] = lambda: run_cli(model_dir, args.folder, rel, args)
                if b2:
                    methods[f"cli index, default, batch {b2}"] = lambda: run_cli(
                        model_dir, args.folder, rel, args, None, b2
                    )
                # The default backend exports the model once (cached by weights hash): untimed.
                run_cli(model_dir, args.folder, rel[:1], args)
        else:
            methods["cli index"] = lambda: run_cli(model_dir, args.folder, rel, args)
        if args.versus:
            versus_dir = Path(tempfile.mkdtemp())
            MoCoEncoder(arch=args.versus).save_pretrained(versus_dir)
            methods[f"cli index, default, {args.versus}"] = lambda: run_cli(
                versus_dir, args.folder, rel, args
            )
            run_cli(versus_dir, args.folder, rel[:1], args)  # its ONNX export: untimed

    for name in args.skip:
        if name in ("model-only", "iter_embeddings") or name not in methods:
            p.error(f"--skip: cannot skip {name!r}; methods: {', '.join(methods)}")
        del methods[name]

    # Warm-up: oneDNN picks its kernels on the first call of each shape and layout.
    run_model_only(encoder, args.batch_size, args.batch_size)
    if b2:
        run_model_only(encoder, b2, b2)
    with torch.no_grad():
        naive_encoder(torch.randn(2, 3, encoder.input_size, encoder.input_size))

    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    summary: dict[str, list[float]] = {}  # a CLI's own timing of its update, per round
    for r in range(args.rounds):
        for name, fn in methods.items():
            c, t = cpu_seconds(), time.perf_counter()
            inner = fn()
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(cpu_seconds() - c)
            extra = ""
            if inner is not None:
                summary.setdefault(name, []).append(inner)
                extra = f"  (summary {n / inner:.2f} img/s, fixed {walls[name][-1] - inner:.1f} s)"
            print(
                f"round {r + 1}: {name:16s} {n / walls[name][-1]:6.2f} img/s  "
                f"{1e3 * cpus[name][-1] / n:7.1f} CPU ms/img{extra}"
            )
    for tmp in (model_dir, linked, versus_dir if args.cli and args.versus else None):
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def paired(a: str, b: str) -> float:
        # Rate of a over rate of b, round by round, then the median: methods that ran seconds
        # apart share the load of the moment, which the best rounds of each may not.
        return statistics.median(wb / wa for wa, wb in zip(walls[a], walls[b], strict=True))

    fixed = {name: statistics.median(w - s for w, s in zip(walls[name], v)) for name, v in
             summary.items()}  # fmt: skip
    for name, v in summary.items():  # the steady state of a CLI run: its summary's timing
        walls[f"{name}, summary"] = v
    cpu_ms = {name: 1e3 * min(v) / n for name, v in cpus.items()}
    head = (
        "| method | images/s (best round) | × model-only | iter_embeddings × this "
        "| CPU ms/image | CPU × model-only |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, wall in walls.items():
        cpu_cols = "— | —"  # a summary's timing has no CPU time of its own
        if name in cpu_ms:
            cpu_cols = f"{cpu_ms[name]:.0f} | {cpu_ms[name] / cpu_ms['model-only']:.2f}"
        lines.append(
            f"| {name} | {n / min(wall):.2f} | {paired(name, 'model-only'):.2f} | "
            f"{paired('iter_embeddings', name):.2f} | {cpu_cols} |"
        )
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    header = (
        f"{describe(source_folder, [r.split('/', 1)[1] for r in rel] if linked else rel)}"
        f"{f' ({n // args.repeat} files, each linked {args.repeat} times)' if linked else ''}"
        f" from `{source_folder}`; {args.arch if args.model else f'{args.arch} (random weights)'}, "
        f"batch {args.batch_size}, workers {args.workers if args.workers is not None else 'auto'}; "
        f"{available_cpus()} CPU cores ({cpu}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; load average {load_before:.2f} before the "
        f"run, {os.getloadavg()[0]:.2f} after; {args.rounds} interleaved rounds (ratios: median of "
        f"per-round ratios; CPU: least per method)."
    )
    if fixed:
        header += (
            " Fixed cost per CLI run (wall minus its summary's time, median): "
            + ", ".join(f"{name} {s:.1f} s" for name, s in fixed.items())
            + "."
        )
    table = "\n".join(lines)
    if args.cli and args.versus:
        ratio = paired("cli index, default", f"cli index, default, {args.versus}")
        table += (
            f"\n\n`mocoretrieval index` (default backend): {args.arch} indexes at "
            f"**{ratio:.2f}×** the rate of {args.versus} (median of per-round ratios)."
        )
    print()
    print(header)
    print(table)
    if not args.no_append:
        append_section("index_throughput", f"{header}\n\n{table}\n", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
