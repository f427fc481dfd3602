"""Seeded edited copies: reproducible, independent of the other files, each kind as documented."""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_images
from PIL import Image

from mocoretrieval.edits import COMBINED, PRESETS, edit, kinds_of, make_copies
from mocoretrieval.errors import MoCoRetrievalError


def _pixels(folder, copies):
    return {(c.original, c.kind): np.asarray(Image.open(folder / c.path)) for c in copies}


def test_same_seed_same_copies_whatever_the_other_files(tmp_path):
    make_images(tmp_path / "src", 3)
    names = ["img_0000.jpg", "img_0001.png", "img_0002.jpg"]
    a, skipped = make_copies(tmp_path / "src", names, tmp_path / "a", "strong", seed=3)
    b, _ = make_copies(tmp_path / "src", names[1:], tmp_path / "b", "strong", seed=3)
    c, _ = make_copies(tmp_path / "src", names, tmp_path / "c", "strong", seed=4)
    assert not skipped
    assert len(a) == 3 * len(kinds_of(PRESETS["strong"])) == 3 * 9
    pa, pb, pc = _pixels(tmp_path / "a", a), _pixels(tmp_path / "b", b), _pixels(tmp_path / "c", c)
    for key, pixels in pb.items():
        assert np.array_equal(pixels, pa[key])
    assert any(pa[k].shape != pc[k].shape or not np.array_equal(pa[k], pc[k]) for k in pc)


def test_each_kind_does_what_it_says():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8))
    preset = PRESETS["standard"]
    rng = np.random.default_rng(0)
    flipped, q = edit(img, "flip", preset, rng)
    assert q is None and np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    gray, _ = edit(img, "grayscale", preset, rng)
    g = np.asarray(gray).astype(int)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    crop, _ = edit(img, "crop", preset, rng)
    area = crop.width * crop.height / (160 * 120)
    assert 0.6 * 0.95 <= area <= 0.9 * 1.05  # 60-90% of the area, up to rounding
    small, _ = edit(img, "downscale", preset, rng)
    assert 0.3 * 160 - 1 <= small.width <= 0.7 * 160 + 1
    same, quality = edit(img, "jpeg", preset, rng)
    assert same is img and 25 <= quality <= 60
    _, quality = edit(img, COMBINED, preset, rng)
    assert 25 <= quality <= 60
    assert "overlay" not in kinds_of(preset) and "overlay" in kinds_of(PRESETS["strong"])


def test_unreadable_original_is_skipped_and_unknown_preset_refused(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    copies, skipped = make_copies(tmp_path, ["bad.jpg"], tmp_path / "out")
    assert copies == [] and skipped == [("bad.jpg", "not an image")]
    with pytest.raises(MoCoRetrievalError, match="light, standard, strong"):
        make_copies(tmp_path, ["bad.jpg"], tmp_path / "out", "extreme")
