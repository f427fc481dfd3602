"""A folder indexed by ``torchrun --nproc-per-node 2`` (gloo) against one process (issue 15, 5b).

Hard-links (or copies) real photos into a temporary folder, indexes it with
``mocoretrieval index`` in one process and with ``torchrun --standalone --nproc-per-node N -m
mocoretrieval index``, and reports:

- the same vectors: the largest absolute difference between the two indexes' vectors of a file;
- the same search results: top-10 agreement, each indexed file's stored vector as a query;
- files (and bytes) per rank, against the goal of within 5% of the mean;
- merge time against embedding time (rank 0's summary line), against the goal of 10%.

Both runs use the torch backend, so that they run the same model code. Usage::

    nice -n 19 python benchmarks/index_distributed.py /work/photos-data --limit 200
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import append_section

from mocoretrieval.data import walk_images
from mocoretrieval.index import ImageIndex
from mocoretrieval.shards import deal

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"(\d+) ranks embedded ([\d, ]+) files \((\d+) found done.*?\) in ([\d.]+) s; "
    r"merged in ([\d.]+) s"
)


def gather_photos(sources: list[Path], limit: int, out: Path) -> dict[str, int]:
    """Links the first ``limit`` distinct image files of ``sources`` (walk order) into
    ``out``, flat; their sizes by name."""
    out.mkdir(parents=True)
    sizes: dict[str, int] = {}
    seen: set[Path] = set()
    for source in sources:
        for rel in walk_images(source):
            if len(sizes) == limit:
                return sizes
            src = (source / rel).resolve()  # a wallpaper is often a link to another's file
            if src in seen or not src.is_file():
                continue
            seen.add(src)
            name = f"{len(sizes):04d}-{Path(rel).name}"
            try:
                os.link(src, out / name)
            except OSError:
                shutil.copy2(src, out / name)
            sizes[name] = src.stat().st_size
    return sizes


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def compare(a: Path, b: Path, k: int = 10) -> tuple[int, float, float, float]:
    """``(embedded files, max |diff| of vectors, fraction of identical top-k lists, mean overlap@k)``."""
    with ImageIndex.open(a) as one, ImageIndex.open(b) as two:
        if one.store.files().keys() != two.store.files().keys():
            sys.exit("the two indexes hold different files")
        if one.store.skipped() != two.store.skipped():
            sys.exit("the two indexes skipped different files")
        va = one.store.entries(sorted(one.store.files()))
        paths = sorted(p for p, e in va.items() if e.vector is not None)
        vb = two.store.entries(paths)
        diff = max(float(np.abs(va[p].vector - vb[p].vector).max()) for p in paths)
        queries = np.stack([va[p].vector for p in paths])
        ra, rb = one.search_batch(list(queries), k=k), two.search_batch(list(queries), k=k)
    same = [[r.relpath for r in x] == [r.relpath for r in y] for x, y in zip(ra, rb)]
    overlap = [len({r.relpath for r in x} & {r.relpath for r in y}) / k for x, y in zip(ra, rb)]
    return len(paths), diff, float(np.mean(same)), float(np.mean(overlap))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of photos to draw from")
    parser.add_argument("--limit", type=int, default=200, help="photos to index (default 200)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--model", help="model source (default: the shipped encoder)")
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="index-distributed-") as tmp:
        tmp = Path(tmp)
        sizes = gather_photos(args.folders, args.limit, tmp / "photos")
        common = ["--backend", "torch", "-q"] + (["--model", args.model] if args.model else [])
        one_s, _ = run(
            [sys.executable, "-m", "mocoretrieval", "index", "photos", "--index", "one", *common],
            tmp,
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(args.nproc), "-m", "mocoretrieval", "index", "photos"]
        ranks_s, out = run([*cmd, "--index", "ranks", *common], tmp)
        found = SUMMARY.search(out)
        if found is None:
            sys.exit(f"no summary line in:\n{out}")
        files = [int(n) for n in found.group(2).split(",")]
        embed_s, merge_s = float(found.group(4)), float(found.group(5))
        n, diff, same, overlap = compare(tmp / "one", tmp / "ranks")
        shares = deal(sizes, args.nproc)  # the deal rank 0 made: the same input, the same deal

    mean = sum(files) / len(files)
    spread = max(abs(f - mean) for f in files) / mean
    mbytes = [sum(sizes[p] for p in share) / 1e6 for share in shares]
    byte_spread = max(abs(b - np.mean(mbytes)) for b in mbytes) / np.mean(mbytes)
    lines = [
        (
            f"{len(sizes)} photos ({sum(sizes.values()) / 1e6:.0f} MB, {n} embedded) from "
            f"{', '.join(map(str, args.folders))}; torch backend, {os.cpu_count()} CPUs shared "
            "with other jobs (wall times are loose)"
        ),
        f"one process:              {one_s:6.1f} s wall (command start to end)",
        f"torchrun, {args.nproc} gloo ranks:    {ranks_s:6.1f} s wall (command start to end)",
        f"same vectors:             max |diff| {diff:.2e} over {n} files",
        (
            f"same search results:      top-10 identical for {same:.1%} of {n} queries, "
            f"mean overlap@10 {overlap:.3f}"
        ),
        f"files per rank:           {files} (max {spread:.1%} from the mean; goal <= 5%)",
        (
            f"MB per rank:              {[round(b, 1) for b in mbytes]} (max {byte_spread:.1%} "
            "from the mean)"
        ),
        (
            f"merge vs embedding:       {merge_s:.3f} s vs {embed_s:.1f} s = "
            f"{merge_s / embed_s:.1%} (goal <= 10%)"
        ),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_append:
        append_section("index_distributed", body)


if __name__ == "__main__":
    main()
