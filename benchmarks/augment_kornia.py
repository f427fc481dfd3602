"""The batched MoCo augmentation (``training.augment.BatchAugment``) against kornia's.

One view of the v2 preset (random resized crop, colour jitter p=0.8, grayscale p=0.2, Gaussian
blur p=0.5, horizontal flip, normalise) on a uint8 batch, built from the same config by both:
ours, and the ``kornia.augmentation`` equivalents (``RandomResizedCrop``, ``ColorJitter``,
``RandomGrayscale``, ``RandomGaussianBlur`` with our kernel size, ``RandomHorizontalFlip``,
``Normalize``). Each rate is the median images/s of ``--repeats`` calls after a warm-up call,
the uint8 -> float conversion included in both. Runs on the CPU, and on CUDA when there is one.

Outputs cannot match bit for bit (different random draws), so equivalence is checked on their
distribution over the same input batch: mean and spread of the (un-normalised) pixels, the
share of gray views (all three channels equal; the recipe's
grayscale p is 0.2), and sharpness
(mean |horizontal difference|, which the crop's zoom and the blur lower).

    python benchmarks/augment_kornia.py                        # CPU (+ CUDA if present)
    python benchmarks/augment_kornia.py --append-results
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import append_section

from training.augment import BatchAugment, blur_sigma
from training.config import preset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def kornia_view(cfg, view: int, size: int) -> torch.nn.Module:
    """kornia.augmentation's pipeline for the same recipe (one view)."""
    import kornia.augmentation as K

    lo, hi = blur_sigma(cfg)
    radius = min(math.ceil(3 * hi), (size - 1) // 2)  # BatchAugment.blur's kernel
    steps = [
        K.RandomResizedCrop((size, size), scale=(cfg.crop_min, 1.0), ratio=(3 / 4, 4 / 3)),
        K.ColorJitter(*cfg.jitter, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
    ]
    if radius >= 1 and cfg.blur_p[view] > 0:
        steps.append(K.RandomGaussianBlur(2 * radius + 1, (lo, hi), p=cfg.blur_p[view]))
    steps += [
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    ]
    return K.AugmentationSequential(*steps)


def images(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Photo-like uint8 batch: smooth random colour fields plus fine noise, (N, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 6, generator=g) * 255
    x = F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False)
    x = x + torch.randn(n, 3, size, size, generator=g) * 12
    return x.clamp(0, 255).to(torch.uint8).to(device)


def rates(fns, x: torch.Tensor, repeats: int) -> list[float]:
    """Images/s of each function on ``x``: median of ``repeats`` calls after a warm-up, the
    functions timed in alternation so that a busy machine slows them alike."""

    def once(fn) -> float:
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        once(fn)  # warm-up: kernels, caches
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(once(fn))
    return [x.shape[0] / statistics.median(t) for t in times]


def stats(out: torch.Tensor) -> dict[str, float]:
    mean = torch.tensor(MEAN, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=out.device).view(1, 3, 1, 1)
    x = (out.float() * std + mean).clamp(0, 1)  # back to [0, 1] pixels
    gray = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-3) & (
        (x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 1e-3
    )
    return {
        "mean": x.mean().item(),
        "std": x.std().item(),
        "gray": gray.float().mean().item(),
        "sharp": (x[..., 1:] - x[..., :-1]).abs().mean().item(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes", nargs="+", default=["32x224", "256x32"], help="BATCHxSIZE, e.g. 256x224"
    )
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if any")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--append-results", action="store_true", help="append to RESULTS.md")
    args = p.parse_args()
    import kornia

    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.manual_seed(0)
    rows = []
    for device in map(torch.device, devices):
        for shape in args.shapes:
            n, size = map(int, shape.split("x"))
            cfg = preset("v2", "resnet18", input_size=size)
            ours = BatchAugment(cfg, 0, MEAN, STD)
            theirs = kornia_view(cfg, 0, size).to(device)
            x = images(n, size, device)

            def kornia_fn(batch: torch.Tensor, theirs=theirs) -> torch.Tensor:
                return theirs(batch.float() / 255.0)

            r_ours, r_k = rates([ours, kornia_fn], x, args.repeats)
            s_ours, s_k = stats(ours(x)), stats(kornia_fn(x))
            rows.append((device.type, shape, r_ours, r_k, s_ours, s_k))
            print(f"{device.type} {shape}: ours {r_ours:.0f} img/s, kornia {r_k:.0f}", flush=True)

    threads = torch.get_num_threads()
    lines = [
        (
            f"kornia {kornia.__version__}, torch {torch.__version__}, {threads} CPU threads; "
            f"v2 preset, view 0; median of {args.repeats} alternating calls after a warm-up; "
            "uint8 input."
        ),
        "",
        (
            "| device | batch x px | ours img/s | kornia img/s | kornia / ours "
            "| mean ours/kornia | std | gray share | sharpness |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dev, shape, r_ours, r_k, s_o, s_k in rows:
        cells = [f"{s_o[k]:.3f} / {s_k[k]:.3f}" for k in ("mean", "std", "gray", "sharp")]
        lines.append(
            f"| {dev} | {shape} | {r_ours:.0f} | {r_k:.0f} | {r_k / r_ours:.2f}x | "
            + " | ".join(cells)
            + " |"
        )
    body = "\n".join(lines)
    print(body)
    if args.append_results:
        append_section("augment_kornia", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
