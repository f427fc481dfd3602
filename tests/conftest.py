"""Shared fixtures: tiny encoders and generated image folders; no network, CPU only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from factories import make_images, make_tiny_encoder

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


@pytest.fixture
def tiny_encoder():
    return make_tiny_encoder()


@pytest.fixture
def tiny_encoder_dir(tmp_path, tiny_encoder):
    out = tmp_path / "encoder"
    tiny_encoder.save_pretrained(out)
    return out


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "photos"
    make_images(root, 12)
    make_images(root / "sub", 6, seed=1)
    return root
