"""Shared fixtures: tiny encoders and generated image folders; no network, CPU only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MOCORETRIEVAL_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    """Models the onnx backend exports are cached in a temporary folder, not in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCORETRIEVAL_CACHE", str(tmp_path_factory.mktemp("model_cache")))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def make_tiny_encoder(arch: str = "resnet18", **kwargs):
    """A small-input encoder with random weights: fast enough to embed hundreds of images."""
    from mocoretrieval import MoCoEncoder

    defaults = dict(input_size=32, resize_size=36, small_stem=arch.startswith("resnet"))
    defaults.update(kwargs)
    return MoCoEncoder(arch=arch, **defaults)


@pytest.fixture
def tiny_encoder():
    return make_tiny_encoder()


@pytest.fixture
def tiny_encoder_dir(tmp_path, tiny_encoder):
    out = tmp_path / "encoder"
    tiny_encoder.save_pretrained(out)
    return out


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


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "photos"
    make_images(root, 12)
    make_images(root / "sub", 6, seed=1)
    return root
