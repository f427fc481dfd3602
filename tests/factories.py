"""Test factories: tiny encoders and generated image folders.

Imported as ``from factories import ...``: a plain module name, unlike ``conftest`` (tests/training
has a conftest of its own, so ``import conftest`` can find either).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_tiny_encoder(arch: str = "resnet18", **kwargs):
    """A small-input encoder with random weights: fast enough to embed hundreds of images."""
    from mocoretrieval import MoCoEncoder

    defaults = {"input_size": 32, "resize_size": 36, "small_stem": arch.startswith("resnet")}
    defaults.update(kwargs)
    return MoCoEncoder(arch=arch, **defaults)


def make_images(
    folder: Path, n: int, size: tuple[int, int] = (64, 48), seed: int = 0
) -> list[Path]:
    """Writes ``n`` distinct random-texture JPEG/PNG images; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        arr = np.kron(base, np.ones((size[1] // 4, size[0] // 4, 1), dtype=np.uint8))
        arr = (
            (arr.astype(np.int16) + rng.integers(-20, 20, arr.shape)).clip(0, 255).astype(np.uint8)
        )
        ext = "jpg" if i % 2 == 0 else "png"
        path = folder / f"img_{i:04d}.{ext}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths
