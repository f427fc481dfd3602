"""Model-only forward rate of one encoder: torch NCHW, torch channels_last and onnxruntime.

Isolates the backends' model speed from decoding, which shares the same cores in `index`.
Prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/model_only.py --arch resnet50 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from results import append_section

from mocoretrieval import MoCoEncoder
from mocoretrieval.onnx_backend import OnnxEncoder
from mocoretrieval.onnx_export import export_onnx


def images_per_s(fn, batch: int, rounds: int) -> float:
    fn()  # warm-up: allocations, onnxruntime's first run
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    encoder = MoCoEncoder(arch=args.arch).eval()
    x = torch.randn(args.batch_size, 3, encoder.input_size, encoder.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(encoder, path)
        onnx_encoder = OnnxEncoder(path)
        rates = {}
        with torch.inference_mode():
            rates["torch NCHW"] = images_per_s(lambda: encoder(x), args.batch_size, args.rounds)
            encoder.to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            rates["torch channels_last"] = images_per_s(
                lambda: encoder(x_cl), args.batch_size, args.rounds
            )
        rates["onnxruntime"] = images_per_s(
            lambda: onnx_encoder.embed(x), args.batch_size, args.rounds
        )
    base = rates["torch channels_last"]
    load = os.getloadavg()[0]
    lines = [
        (
            f"{args.arch} (random weights), batch {args.batch_size}, {encoder.input_size} px, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average {load:.2f}; best of {args.rounds}."
        ),
        "",
        "| backend | images/s | × torch channels_last |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {r:.2f} | {r / base:.2f} |" for name, r in rates.items()),
    ]
    print("\n".join(lines))
    if not args.no_append:
        append_section("model_only", "\n".join(lines))


if __name__ == "__main__":
    main()
