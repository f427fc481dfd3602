"""End-to-end indexing with the onnxruntime backend (fp32 and int8) against the torch backend.

Measures, in one run, on the same folder of large real JPEGs and the same random-weight encoder:

- ``torch``: ``ImageIndex.build`` with the torch encoder (eager, channels_last, inference mode),
  what ``mocoretrieval index --backend torch`` runs;
- ``onnx fp32``: the same with the exported model on onnxruntime (``--backend onnx``, the CPU
  default of ``--backend auto``);
- ``onnx int8``: the same with the statically quantized model (``--quantize int8``), calibrated
  on a sample of the same folder.

Each round builds a fresh index (decoding, embedding, storing, FAISS) per backend; backends are
interleaved over ``--rounds`` rounds and each keeps its best, so load from other processes hits
them alike. CPU time (this process and its decoding workers) is shown beside wall time. The
one-time costs (export, quantization) are reported apart: they are paid once per model.

Then the quality of int8: on ``--recall-limit`` JPEGs spread over the folder, recall@10 of the
int8 embeddings' neighbours against the fp32 ones (ground truth: exact search over fp32), and the
per-image cosine between the two; and, on the indexed JPEGs, the fp32 ONNX embeddings' cosine to
torch's. Usage::

    python benchmarks/onnx_vs_torch.py --folder /usr/share/wallpapers --limit 40
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from index_throughput import cpu_seconds, describe, pick_jpegs
from results import append_section

from mocoretrieval import MoCoEncoder
from mocoretrieval.embed import available_cpus, iter_embeddings
from mocoretrieval.index import ImageIndex
from mocoretrieval.onnx_backend import OnnxEncoder
from mocoretrieval.onnx_cache import cached_onnx
from mocoretrieval.onnx_quantize import sample_evenly
from mocoretrieval.walk import walk_images


def link_folder(folder: Path, rel: list[str], dest: Path) -> Path:
    """A folder of exactly these files, as symlinks (the index lists symlinked files)."""
    for r in rel:
        (dest / r).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(folder / r, dest / r)
    return dest


def build_index(encoder, photos: Path, index_dir: Path, args) -> int:
    index = ImageIndex.build(
        photos,
        encoder,
        index_dir,
        batch_size=args.batch_size,
        workers=args.workers,
        device="cpu",
    )
    n = len(index)
    index.close()
    return n


def embed_all(encoder, folder: Path, rel: list[str], args) -> np.ndarray:
    batches = iter_embeddings(
        encoder, folder, rel, batch_size=args.batch_size, workers=args.workers, device="cpu"
    )
    return np.concatenate([b.vectors for b in batches])


def recall_at_k(reference: np.ndarray, approx: np.ndarray, k: int) -> float:
    """Mean overlap of each image's k nearest neighbours (itself excluded) under both."""

    def knn(x: np.ndarray) -> np.ndarray:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    truth, got = knn(reference), knn(approx)
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth, got)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/usr/share/wallpapers"))
    p.add_argument("--limit", type=int, default=40, help="JPEGs to index")
    p.add_argument("--min-mpix", type=float, default=2.0, help="skip JPEGs smaller than this")
    p.add_argument("--arch", default="resnet50")
    p.add_argument(
        "--model",
        metavar="SOURCE",
        help="measure this encoder (e.g. the default, whose int8 recall depends on its "
        "trained weights) instead of random --arch weights",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: each backend's own default (8 for torch on CPU, 32 for onnxruntime)",
    )
    p.add_argument("--workers", type=int, default=None, help="default: iter_embeddings' choice")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--recall-limit", type=int, default=100, help="JPEGs to measure recall on")
    p.add_argument("--no-int8", action="store_true", help="skip quantization and its recall")
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    rel = pick_jpegs(args.folder, args.limit, args.min_mpix * 1e6)
    if not rel:
        p.error(f"no JPEG of at least {args.min_mpix} MPix under {args.folder}")
    n = len(rel)
    torch.manual_seed(0)
    if args.model:
        encoder = MoCoEncoder.from_pretrained(args.model)
        weights = f"{args.model} ({encoder.arch}, {encoder.input_size} px, trained weights)"
    else:
        encoder = MoCoEncoder(arch=args.arch)  # random weights: speed does not depend on them
        weights = f"{args.arch} (random weights)"
    tmp = Path(tempfile.mkdtemp(prefix="onnx_vs_torch-"))
    photos = link_folder(args.folder, rel, tmp / "photos")
    all_jpegs = [r for r in walk_images(args.folder) if r.lower().endswith((".jpg", ".jpeg"))]
    recall_set = sample_evenly(all_jpegs, args.recall_limit)

    t = time.perf_counter()
    fp32_path = cached_onnx(encoder, tmp / "cache")
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    onnx_fp32 = OnnxEncoder(fp32_path)
    session_s = time.perf_counter() - t
    backends = {"torch": encoder, "onnx fp32": onnx_fp32}
    quantize_s = None
    if not args.no_int8:
        t = time.perf_counter()
        calibration = [args.folder / r for r in all_jpegs]  # a sample of 64, spread evenly
        int8_path = cached_onnx(encoder, tmp / "cache", "int8", calibration)
        quantize_s = time.perf_counter() - t
        backends["onnx int8"] = OnnxEncoder(int8_path)

    # Warm-up: oneDNN and onnxruntime pick kernels and allocate on the first batch. The torch
    # encoder goes channels_last as iter_embeddings puts it (the weights hash is unchanged).
    warm = torch.randn(args.batch_size or 8, 3, encoder.input_size, encoder.input_size)
    encoder.to(memory_format=torch.channels_last)
    for backend in backends.values():
        cl = backend is encoder
        backend.embed(warm.contiguous(memory_format=torch.channels_last) if cl else warm)

    best = {name: float("inf") for name in backends}
    best_cpu = {name: float("inf") for name in backends}
    for r in range(args.rounds):
        for name, backend in backends.items():
            index_dir = tmp / f"index-{r}-{name.replace(' ', '_')}"
            c, t = cpu_seconds(), time.perf_counter()
            done = build_index(backend, photos, index_dir, args)
            wall, used = time.perf_counter() - t, cpu_seconds() - c
            if done != n:
                raise RuntimeError(f"{name}: indexed {done} of {n} files")
            best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], used)
            print(
                f"round {r + 1}: {name:10s} {n / wall:6.2f} img/s  {1e3 * used / n:7.1f} CPU ms/img"
            )

    # Quality: fp32 parity on the indexed JPEGs, int8 recall on JPEGs spread over the folder.
    parity = (
        embed_all(encoder, args.folder, rel, args) * embed_all(onnx_fp32, args.folder, rel, args)
    ).sum(1)
    quality = [
        (
            f"onnx fp32 vs torch on the {n} JPEGs: cosine per image min "
            f"{parity.min():.6f}, mean {parity.mean():.6f}."
        )
    ]
    if "onnx int8" in backends:
        ref_fp32 = embed_all(onnx_fp32, args.folder, recall_set, args)
        q = embed_all(backends["onnx int8"], args.folder, recall_set, args)
        cos = (q * ref_fp32).sum(1)
        spread = ref_fp32 @ ref_fp32.T
        quality.append(
            f"onnx int8 vs fp32 on {len(recall_set)} JPEGs spread over the folder: recall@10 "
            f"{recall_at_k(ref_fp32, q, 10):.3f}, recall@1 {recall_at_k(ref_fp32, q, 1):.3f}; "
            f"cosine per image min {cos.min():.4f}, mean {cos.mean():.4f} (for scale: fp32 "
            f"cosine between different images, median {np.median(spread):.3f})."
        )

    rate = {name: n / s for name, s in best.items()}
    cpu_ms = {name: 1e3 * s / n for name, s in best_cpu.items()}
    lines = [
        "| backend | images/s | × torch | CPU ms/image | CPU × torch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in backends:
        lines.append(
            f"| {name} | {rate[name]:.2f} | {rate[name] / rate['torch']:.2f} | "
            f"{cpu_ms[name]:.0f} | {cpu_ms[name] / cpu_ms['torch']:.2f} |"
        )
    import onnxruntime

    once = f"One-time: export {export_s:.1f} s, onnxruntime session {session_s:.1f} s"
    once += (
        f", int8 quantization (64 calibration images) {quantize_s:.1f} s." if quantize_s else "."
    )
    header = (
        "End-to-end `ImageIndex.build` (decode, embed, store, FAISS) of "
        f"{describe(args.folder, rel)} from `{args.folder}`; {weights}, "
        f"batch {args.batch_size or 'default (torch 8, onnxruntime 32)'}, workers "
        f"{args.workers if args.workers is not None else 'auto'}; {available_cpus()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{onnxruntime.__version__}; load average before the run {load_before:.2f}; best of "
        f"{args.rounds} interleaved rounds."
    )
    table = "\n".join(lines)
    notes = "\n".join(f"- {line}" for line in [once, *quality])
    print(f"\n{header}\n{table}\n{notes}")
    shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_append:
        append_section("onnx_vs_torch", f"{header}\n\n{table}\n\n{notes}\n", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
