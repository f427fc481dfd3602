"""The large-collection index type at scale (issue 15, item 5a): build memory, latency, recall.

N synthetic clustered 256-d vectors (the generator of ``benchmarks/search.py``, one
deterministic seed per chunk) are written chunk by chunk, as a float16 vector file that stands
in for a ``--store-dtype float16`` store. The on-disk index is then built from that file through
the library's own path — :func:`mocoretrieval.ondisk.build` (train on a sample, fill shard by
shard, merge the lists on disk, tune nprobe and the re-ranking depth to recall@10 0.95),
:func:`mocoretrieval.ann.save` — in a child process, whose own peak RSS (``ru_maxrss``) is the
build's. Not through a SQLite ``Store``: inserting 10M rows costs an hour here and measures
SQLite, not the index; the index reads the same float32 chunks either way.

Then, in this process: the index loaded as a reader loads it (lists memory-mapped), 1,000
held-out queries (new draws from the same distribution), single-query latency on every core
(the library scans one query's lists in parallel; exact re-ranking included: its vectors
are read from the file by id, like the store), and recall@10 against exact search computed
chunk by chunk. Usage::

    python benchmarks/scale.py --n 1000000 --no-append     # develop
    nice -n 19 python benchmarks/scale.py                  # 10M, the issue's size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from results import append_section

from mocoretrieval import ann, ondisk, ondisk_plan
from mocoretrieval.rerank import RerankedIndex

CHUNK = 100_000  # vectors generated (and read back) at a time: 100k x 256 x 4 = 100 MB
CLUSTERS = 10_000
LATENT = 32


def generated_chunk(i: int, n: int, dim: int, seed: int) -> np.ndarray:
    """Chunk ``i`` of the collection: (m, dim) unit float32 vectors, the same on every call.

    Gaussian blobs around fixed centres in a 32-d latent space mapped to ``dim`` dimensions,
    plus noise (as ``benchmarks/search.py``: a low intrinsic dimension, overlapping blobs).
    """
    base = np.random.default_rng(seed)
    centres = base.standard_normal((CLUSTERS, LATENT), dtype=np.float32)
    lift = base.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    rng = np.random.default_rng([seed, i])
    m = min(CHUNK, n - i * CHUNK)
    z = centres[rng.integers(0, CLUSTERS, m)] + rng.standard_normal((m, LATENT), np.float32)
    x = z @ lift + 0.1 * rng.standard_normal((m, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class VectorFile:
    """A raw float16 (N, dim) file, row i holding id i: a :class:`ann.VectorSource` read in
    chunks with plain reads (no mapping, so the pages do not count in the RSS), and the lookup
    of the exact re-ranking (one ``pread`` per row, as the store's indexed blob reads)."""

    def __init__(self, path: Path, n: int, dim: int) -> None:
        self.path, self.n, self.dim = path, n, dim
        self.row = dim * 2
        self.fd = os.open(path, os.O_RDONLY)

    def chunks(self):
        with open(self.path, "rb") as f:
            for start in range(0, self.n, CHUNK):
                m = min(CHUNK, self.n - start)
                v = np.fromfile(f, dtype="<f2", count=m * self.dim).reshape(m, self.dim)
                yield np.arange(start, start + m, dtype=np.int64), v.astype(np.float32)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.unique(ids[(ids >= 0) & (ids < self.n)])
        buf = b"".join(os.pread(self.fd, self.row, int(i) * self.row) for i in found)
        vectors = np.frombuffer(buf, dtype="<f2").reshape(len(found), self.dim)
        return found, vectors.astype(np.float32)


def generate(path: Path, n: int, dim: int, seed: int) -> None:
    """Writes the collection, chunk by chunk (the 'embedding' step: not part of the build)."""
    with open(path, "wb") as f:
        for i in range((n + CHUNK - 1) // CHUNK):
            generated_chunk(i, n, dim, seed).astype("<f2").tofile(f)


def build_child(work: Path, n: int, dim: int) -> None:
    """The measured build: what ``FaissFile`` does for the on-disk type, from the vector file."""
    source = VectorFile(work / "vectors.f16", n, dim)
    factory = ondisk_plan.factory_for(n, dim)
    t0 = time.perf_counter()
    built = ondisk.build(source, factory, work / "lists-bench.ivfdata", source.lookup)
    size = ann.save(built.index.base, work / "index.faiss")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "factory": factory,
        "params": built.params,
        "tuned_recall": built.recall,
        "seconds": time.perf_counter() - t0,
        "index_bytes": size,
        "lists_bytes": (work / "lists-bench.ivfdata").stat().st_size,
        "peak_rss": peak,
    }
    (work / "build.json").write_text(json.dumps(report))


def exact_top(queries: np.ndarray, source: VectorFile, k: int) -> np.ndarray:
    """(nq, k) exact neighbours by inner product, one chunk of the collection at a time."""
    return ann._exact_neighbours(queries, source, k)


def measure(index: RerankedIndex, queries: np.ndarray, truth: np.ndarray):
    """(p50 ms, p95 ms, recall@10) of one query per ``search`` call."""
    ms, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(index.search(q[None], 10)[1][0])
        ms.append((time.perf_counter() - t) * 1e3)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))
    p50, p95 = np.percentile(ms, [50, 95])
    return float(p50), float(p95), recall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temp dir)")
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    parser.add_argument(
        "--search-only", action="store_true", help="measure the index --work already holds"
    )
    parser.add_argument("--build-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_child:
        build_child(args.work, args.n, args.dim)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "vectors.f16").is_file():
        generate(work / "vectors.f16", args.n, args.dim, args.seed)
    gen_s = time.perf_counter() - t0
    child = [sys.executable, __file__, "--build-child", "--work", str(work)]
    if not args.search_only:
        subprocess.run([*child, "--n", str(args.n), "--dim", str(args.dim)], check=True)
    report = json.loads((work / "build.json").read_text())

    source = VectorFile(work / "vectors.f16", args.n, args.dim)
    index = RerankedIndex(ondisk.load(work / "index.faiss"), source.lookup)
    ann.set_params(index, report["params"])
    # Held-out queries: the same blobs, draws no chunk of the collection makes.
    queries = generated_chunk(10**6, CHUNK * 10**6 + args.queries, args.dim, args.seed)
    t1 = time.perf_counter()
    truth = exact_top(queries, source, 10)
    exact_s = time.perf_counter() - t1
    threads = faiss.omp_get_max_threads()  # the library's default: every core
    index.search(queries[:20], 10)  # warm the quantizer's pages
    p50, p95, recall = measure(index, queries, truth)
    # The library tunes to recall 0.95; the goal is stated at 0.9: a sweep of nprobe at the
    # tuned re-ranking depth shows the latency at each recall.
    nlist = faiss.extract_index_ivf(index.base).nlist
    sweep = []
    for nprobe in (8, 16, 32, 64, 128, 256, 512):
        if nprobe < nlist:
            ann.set_params(index, {**report["params"], "nprobe": nprobe})
            sweep.append((nprobe, *measure(index, queries, truth)))
    gib = 1 << 30
    fast_enough = any(b <= 5 and d >= 0.9 for _, b, _, d in [(0, p50, 0, recall), *sweep])
    store_bytes = args.n * args.dim * 2
    body = (
        f"{args.n:,} x {args.dim} synthetic clustered vectors ({CLUSTERS:,} blobs, float16 "
        f"vector file standing in for the store), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs.\n\n"
        "| factory | params | build s | peak RSS of build | index.faiss | lists (.ivfdata) "
        "| float16 vectors | p50 ms | p95 ms | recall@10 |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| `{report['factory']}` | {report['params']} | {report['seconds']:.0f} "
        f"| {report['peak_rss'] / gib:.2f} GiB | {report['index_bytes'] / 2**20:.1f} MiB "
        f"| {report['lists_bytes'] / 2**20:.0f} MiB | {store_bytes / gib:.2f} GiB "
        f"| {p50:.2f} | {p95:.2f} | {recall:.3f} |\n\n"
        f"Tuned recall@10 on stored vectors {report['tuned_recall']:.3f}; {args.queries} held-out "
        f"queries, one per call on {threads} threads, exact re-ranking included; exact search "
        f"(chunked) {exact_s:.0f} s; generating the vectors {gen_s:.0f} s (not in the build).\n"
        f"\nnprobe sweep at k_factor {report['params'].get('k_factor')} (same queries):\n\n"
        "| nprobe | p50 ms | p95 ms | recall@10 |\n| --- | --- | --- | --- |\n"
        + "".join(f"| {a} | {b:.2f} | {c:.2f} | {d:.3f} |\n" for a, b, c, d in sweep)
        + f"\nGoals: peak RSS <= 4 GB: {'met' if report['peak_rss'] <= 4e9 else 'NOT met'}; "
        f"p50 <= 5 ms at recall@10 >= 0.9: "
        f"{'met' if fast_enough else 'NOT met'}."
    )
    print(body)
    if not args.no_append:
        append_section("scale", body, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
