"""Fixtures of the reliability suite (issue 13): two saved tiny encoders and a small index."""

from __future__ import annotations

import shutil

import pytest
import torch
from factories import make_images, make_tiny_encoder

from mocoretrieval.index import ImageIndex


@pytest.fixture(scope="session")
def two_models(tmp_path_factory):
    """``(A, B)``: directories of two tiny encoders with different weights, same dimension."""
    base = tmp_path_factory.mktemp("models")
    out = []
    for seed, name in ((0, "A"), (1, "B")):
        torch.manual_seed(seed)
        make_tiny_encoder().save_pretrained(base / name)
        out.append(base / name)
    return tuple(out)


@pytest.fixture(scope="session")
def _built_a(tmp_path_factory, two_models):
    base = tmp_path_factory.mktemp("built_a")
    root = base / "photos"
    make_images(root, 8)
    ImageIndex.build(root, model=two_models[0], workers=0).close()
    return root


@pytest.fixture
def indexed(tmp_path, _built_a):
    """A fresh copy of an 8-image folder indexed with model A."""
    root = tmp_path / "photos"
    shutil.copytree(_built_a, root)
    return root
