"""Preprocess: torchvision's eval transform, pixel for pixel, in a worker half and a batch half."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mocoretrieval.preprocess import Preprocess, resized_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LEVEL = 1 / 255 / min(STD)  # one uint8 intensity step, in normalised units


def reference(resize: int, crop: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


@pytest.mark.parametrize(
    ("width", "height", "resize", "crop"),
    [
        (640, 400, 256, 224),  # a landscape draft decode
        (400, 640, 256, 224),  # portrait
        (641, 359, 256, 224),  # odd sizes: CenterCrop's rounding
        (455, 256, 256, 224),  # already at the resize size
        (1000, 1000, 256, 224),
        (90, 60, 30, 24),  # the tiny test encoders
        (37, 53, 256, 224),  # upsampling
        (300, 20, 32, 32),  # resize equal to the crop
        (80, 60, 36, 48),  # crop larger than the resize: zero padding
    ],
)
def test_matches_torchvision_within_one_level(width, height, resize, crop):
    rng = np.random.default_rng(width * height)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
    want = reference(resize, crop)(img)
    got = Preprocess(resize, crop, MEAN, STD)(img)
    assert got.shape == want.shape == (3, crop, crop) and got.dtype == torch.float32
    diff = (got - want).abs()
    assert diff.max().item() <= LEVEL + 1e-5
    assert (diff > 1e-5).float().mean().item() < 0.02  # and only a few pixels differ at all


def test_worker_and_batch_halves_compose_to_the_call():
    pre = Preprocess(36, 32, MEAN, STD)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50 + i, 70, 3), np.uint8)) for i in range(3)]
    pixels = [pre.pixels(im) for im in images]
    assert all(p.dtype == np.uint8 and p.shape == (32, 32, 3) for p in pixels)
    batch = pre.normalize(torch.from_numpy(np.stack(pixels)))
    assert batch.shape == (3, 3, 32, 32)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch, torch.stack([pre(im) for im in images]), atol=0, rtol=0)


def test_resized_size_keeps_aspect_with_short_side_fixed():
    assert resized_size(640, 400, 256) == (409, 256)
    assert resized_size(400, 640, 256) == (256, 409)
    assert resized_size(256, 256, 224) == (224, 224)
