"""training.tiles: seeded tiles of training pictures, and the distractor folder of artwork.

Checked by mutation: seeding the tiles' generator without the picture's path (one sequence of
boxes for every picture) fails ``test_tiles_are_seeded_per_picture``; dropping the photo-folder
check of ``write_distractors`` fails ``test_distractors_leave_out_the_photographs``.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from PIL import Image

from mocoretrieval.errors import DatasetError
from training.flat_art import MIN_STD, flat_art
from training.photos import main as photos_main
from training.tiles import MARKER, cut_tiles, tile_boxes, write_distractors


def _picture(path, size, seed):
    """Random 8x8 colour blocks, smoothly upscaled: distinct per seed, JPEG-friendly."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    arr = np.asarray(small.resize(size, Image.Resampling.BICUBIC))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def test_tile_boxes_are_squares_inside_the_picture():
    boxes = tile_boxes(300, 200, 50, 0.25, random.Random(0))
    assert len(boxes) == 50
    assert boxes[0] == (50, 0, 250, 200)  # the largest centred square first
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 == y1 - y0 and 50 <= x1 - x0 <= 200
        assert 0 <= x0 and 0 <= y0 and x1 <= 300 and y1 <= 200
    with pytest.raises(DatasetError):
        tile_boxes(300, 200, 5, 0.0, random.Random(0))


def test_tiles_are_seeded_per_picture(tmp_path):
    src = tmp_path / "train"
    _picture(src / "a" / "one.jpg", (160, 120), 1)
    _picture(src / "b" / "two.jpg", (160, 120), 2)
    report = cut_tiles(src, tmp_path / "tiles", per_picture=6, size=32)
    assert (report.pictures, report.tiles) == (2, 12)
    tiles = sorted(p.relative_to(tmp_path / "tiles") for p in (tmp_path / "tiles").rglob("*.jpg"))
    assert [str(t) for t in tiles[:2]] == ["a/one/0000.jpg", "a/one/0001.jpg"]
    assert Image.open(tmp_path / "tiles" / tiles[0]).size == (32, 32)
    # the same arguments give the same bytes; each picture draws its own boxes
    cut_tiles(src, tmp_path / "again", per_picture=6, size=32)
    for t in tiles:
        assert (tmp_path / "tiles" / t).read_bytes() == (tmp_path / "again" / t).read_bytes()

    def boxes(rel):
        key = hashlib.sha256(f"0/{rel}".encode()).digest()
        return tile_boxes(160, 120, 6, 0.2, random.Random(int.from_bytes(key[:8], "big")))

    # the same picture under two names gets two different sets of tiles (but one centre tile)
    _picture(src / "c" / "copy.jpg", (160, 120), 2)
    (src / "c" / "copy.jpg").write_bytes((src / "b" / "two.jpg").read_bytes())
    cut_tiles(src, tmp_path / "with-copy", per_picture=6, size=32)
    same = [
        (tmp_path / "with-copy" / "b" / "two" / f"{i:04d}.jpg").read_bytes()
        == (tmp_path / "with-copy" / "c" / "copy" / f"{i:04d}.jpg").read_bytes()
        for i in range(6)
    ]
    assert same[0] and not any(same[1:])
    picture = Image.open(src / "b" / "two.jpg").convert("RGB")
    got = np.asarray(Image.open(tmp_path / "tiles" / "b" / "two" / "0003.jpg")).astype(int)
    errors = [
        np.abs(np.asarray(picture.resize((32, 32), box=box)).astype(int) - got).mean()
        for box in boxes("b/two.jpg")
    ]
    assert int(np.argmin(errors)) == 3  # tile 3 shows box 3 of that picture


def test_tiles_refuse_to_overwrite_unless_forced(tmp_path, capsys):
    src = tmp_path / "train"
    _picture(src / "one.jpg", (64, 64), 1)
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="exists"):
        cut_tiles(src, tmp_path / "mine", per_picture=2, size=16)
    with pytest.raises(DatasetError, match="not a tile folder"):
        cut_tiles(src, tmp_path / "mine", per_picture=2, size=16, force=True)
    assert photos_main(["tiles", str(src), str(tmp_path / "t"), "--per-picture", "3",
                        "--size", "16"]) == 0  # fmt: skip
    assert "wrote 3 tiles of 1 pictures" in capsys.readouterr().out
    assert photos_main(["tiles", str(src), str(tmp_path / "t"), "--per-picture", "2",
                        "--size", "16", "--force"]) == 0  # fmt: skip
    assert len(list((tmp_path / "t").rglob("*.jpg"))) == 2 and (tmp_path / "t" / MARKER).exists()
    assert not list(tmp_path.glob(".t.tmp-*"))  # the build folder is gone


def test_distractors_leave_out_the_photographs(tmp_path):
    wall = tmp_path / "wallpapers"
    photo = wall / "Lake" / "contents" / "images" / "1920x1080.jpg"
    _picture(photo, (96, 54), 1)
    _picture(wall / "Lake" / "contents" / "screenshot.jpg", (40, 30), 1)
    _picture(wall / "Lake" / "contents" / "images" / "640x360.jpg", (64, 36), 6)  # unlisted size
    _picture(wall / "Render" / "contents" / "images" / "1920x1080.jpg", (96, 54), 2)
    _picture(wall / "Render" / "contents" / "images" / "640x480.jpg", (64, 48), 3)
    _picture(wall / "Render" / "contents" / "screenshot.jpg", (40, 30), 2)
    backgrounds = tmp_path / "backgrounds"
    _picture(backgrounds / "pattern.jpg", (80, 60), 4)
    (backgrounds / "same-bytes.jpg").write_bytes((backgrounds / "pattern.jpg").read_bytes())
    _picture(backgrounds / "pattern_160x120.jpg", (160, 120), 7)  # a larger size of it
    _picture(backgrounds / "portrait.jpg", (60, 80), 5)
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(backgrounds / "transparent.png")
    report = write_distractors(
        tmp_path / "out", {str(photo.resolve())}, roots=(str(wall), str(backgrounds))
    )
    names = sorted(p.name for p in (tmp_path / "out").glob("*.jpg"))
    # the render once (its largest size), the two distinct backgrounds (pattern at its largest
    # size); no photo, no screenshot, nothing blank
    assert len(names) == 3 and report.pictures == 3, names
    assert not any("Lake" in n or "transparent" in n for n in names)
    sizes = sorted(Image.open(tmp_path / "out" / n).size for n in names)
    assert sizes == [(60, 80), (96, 54), (160, 120)]
    assert any("blank" in why for why in report.skipped)


def test_flat_art_is_seeded_distinct_and_never_blank(tmp_path):
    """Mutations that fail it: the number left out of the key (every picture the same), the
    blank check removed (numbers 1, 6, 8 and 10 of seed 0 are then near-blank)."""
    pictures = [np.asarray(flat_art(0, i, 32)) for i in range(12)]
    assert all(p.shape == (32, 32, 3) for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 12  # each number its own picture
    assert np.array_equal(np.asarray(flat_art(0, 3, 32)), pictures[3])  # a pure function
    assert not np.array_equal(np.asarray(flat_art(1, 3, 32)), pictures[3])  # the seed matters
    grey = [np.asarray(Image.fromarray(p).convert("L"), np.float64).std() for p in pictures]
    assert min(grey) >= MIN_STD
    out = tmp_path / "tiles" / "flat-art"
    assert photos_main(["flat-art", str(out), "--n", "3", "--size", "32"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert np.array_equal(np.asarray(Image.open(out / "00001.png").convert("RGB")), pictures[1])
    assert photos_main(["flat-art", str(out), "--n", "3", "--size", "32"]) == 1  # no --force
