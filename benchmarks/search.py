"""Search speed and recall of the automatic index choice, against exact search, in one run.

For each ``N x dim`` size: random-but-clustered L2-normalised vectors (Gaussian blobs around
random centres, like image embeddings), the index :func:`mocoretrieval.ann.auto_factory` picks
for N, built and tuned by :func:`mocoretrieval.ann.build` exactly as ``ImageIndex`` does
(train on a sample, add, tune nprobe/efSearch on stored vectors). Then, on held-out queries
from the same distribution (not in the index): recall@10 against exact inner-product search,
batch throughput, and single-query latency (one query per call, p50/p95) beside the exact
``Flat`` index's single-query latency over the same vectors.

1M x 2048 float32 is 8 GB, twice that with the index's copy; on a small machine the 1M size is
run at dim 512 (the default here), which is stated in the table. Usage::

    python benchmarks/search.py                      # 100000x2048 and 1000000x512
    python benchmarks/search.py --sizes 20000x256 --no-append
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import faiss
import numpy as np
from results import append_section

from mocoretrieval import ann


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator, chunk: int = 65536):
    """(n, dim) float32 unit vectors with the structure of image embeddings.

    Points are Gaussian blobs around ``clusters`` centres in a 32-d latent space (blob width
    equal to the spread of the centres, so neighbouring blobs overlap), mapped to ``dim``
    dimensions by a fixed random linear map, plus a little isotropic noise: a low intrinsic
    dimension and no clean cluster boundaries, which is what makes IVF search non-trivial
    (measured at 60k x 128 with 980 lists: a 64-d latent space reaches recall@10 0.95 at
    nprobe=4, a 32-d one needs nprobe=64).
    """
    # Deep image features have an intrinsic dimension of a few tens (Ansuini et al., Intrinsic
    # dimension of data representations in deep neural networks, NeurIPS 2019).
    latent = 32
    centres = rng.standard_normal((clusters, latent), dtype=np.float32)
    lift = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, latent), np.float32)
        x = z @ lift + 0.1 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def single_query_ms(index, queries: np.ndarray) -> np.ndarray:
    """Milliseconds per ``search`` of one query, on one FAISS thread.

    One thread: a single query does not split well across threads, and on a shared machine
    OpenMP's waiting threads would measure the neighbours' load instead of the index.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = np.empty(len(queries))
    try:
        for i in range(len(queries)):
            t0 = time.perf_counter()
            index.search(queries[i : i + 1], 10)
            times[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads)
    return times * 1e3


def run_size(n: int, dim: int, n_queries: int, n_exact_latency: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # About 100 points per cluster, as in a photo collection of many events/scenes.
    data = clustered(n + n_queries, dim, max(10, n // 100), rng)
    base, queries = data[:n], data[n:]
    ids = np.arange(n, dtype=np.int64)

    factory = ann.auto_factory(n, dim)
    built = ann.build(ids, base, factory, seed=seed)
    index = built.index

    t0 = time.perf_counter()
    _, exact = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact_batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_s = time.perf_counter() - t0
    recall = float(np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found)]))

    lat = single_query_ms(index, queries)
    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    exact_lat = single_query_ms(flat, queries[:n_exact_latency])
    del flat
    return {
        "N": n,
        "dim": dim,
        "factory": built.factory,
        "params": ",".join(f"{k}={v}" for k, v in built.params.items()) or "-",
        "build_s": built.seconds,
        "tuned_recall": built.recall,
        "recall": recall,
        "qps": len(queries) / batch_s,
        "exact_qps": len(queries) / exact_batch_s,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "exact_p50": float(np.percentile(exact_lat, 50)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000x2048,1000000x512", help="NxDIM,NxDIM,...")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    p.add_argument(
        "--exact-latency-queries", type=int, default=100, help="single queries timed on Flat"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes.split(","):
        n, dim = (int(v) for v in size.lower().split("x"))
        t0 = time.perf_counter()
        row = run_size(n, dim, args.queries, args.exact_latency_queries, args.seed)
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"done {n}x{dim} in {row['total_s']:.0f} s", file=sys.stderr)

    header = (
        f"{platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} FAISS "
        f"threads (single-query latency: 1), faiss {faiss.__version__}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (shared machine); peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB; {args.queries} "
        "held-out queries per size"
    )
    lines = [
        (
            "| N x dim | auto index | params | build s (train+add+tune) | recall@10 tuning "
            "sample | recall@10 held-out | batch q/s (exact) | p50 ms | p95 ms | exact p50 ms "
            "| p50 speed-up |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tuned = "-" if r["tuned_recall"] is None else f"{r['tuned_recall']:.3f}"
        lines.append(
            f"| {r['N']:,} x {r['dim']} | `{r['factory']}` | {r['params']} | {r['build_s']:.1f} "
            f"| {tuned} | {r['recall']:.3f} | {r['qps']:,.0f} ({r['exact_qps']:,.0f}) "
            f"| {r['p50']:.2f} | {r['p95']:.2f} | {r['exact_p50']:.2f} "
            f"| {r['exact_p50'] / r['p50']:.1f}x |"
        )
    table = "\n".join(lines)
    print(header)
    print(table)
    if not args.no_append:
        append_section("search", f"{header}\n\n{table}\n", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
