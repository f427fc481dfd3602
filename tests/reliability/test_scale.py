"""Issue 13, defect 17: memory at scale. The decode is bounded by bytes as well as pixels, and
the database gives back the space of many deletions."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from factories import make_images
from PIL import Image

from mocoretrieval import data
from mocoretrieval.errors import ImageError
from mocoretrieval.index import ImageIndex


def test_the_decode_is_bounded_by_bytes_not_only_pixels(tmp_path, monkeypatch):
    """Fails without the fix: a 32-bit float image was decoded whatever its bytes."""
    monkeypatch.setattr(data, "MAX_DECODE_BYTES", 100_000, raising=False)
    Image.fromarray(np.zeros((200, 200), np.float32), "F").save(tmp_path / "deep.tif")
    Image.new("L", (200, 200)).save(tmp_path / "grey.png")  # 40 kB decoded: fine
    with pytest.raises(ImageError, match="too large to decode"):
        data.load_image(tmp_path / "deep.tif")
    assert data.load_image(tmp_path / "grey.png").size == (200, 200)


def test_many_deletions_give_the_space_back(tmp_path, two_models):
    """Fails without the fix: the freed pages stayed in the database file for good."""
    root = tmp_path / "photos"
    paths = make_images(root, 24, size=(96, 96))
    index = ImageIndex.build(root, model=two_models[0], workers=0)
    for p in paths[4:]:
        p.unlink()
    assert len(index.update(workers=0).removed) == 20
    db = sqlite3.connect(index.store.path)
    free, total = (
        db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_count")
    )
    assert free / total <= 0.25, (free, total)
    assert len(index) == 4
