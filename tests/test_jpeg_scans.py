"""Progressive JPEGs decoded at 1/8 scale from their lean rewrite (mocoretrieval.jpeg_scans).

Mutations checked (each fails a test here): dropping the full-resolution AC scans instead of
replacing them (the decoder's block smoothing then moves the pixels: the equality tests);
emptying the chroma scans of a 4:2:0 file too (the equality test of 4:2:0); not calling the
rewrite from load_image (``test_load_image_takes_the_rewrite``). Not covered: restoring the
file's own Huffman table after an emptied scan, as libjpeg (so Pillow) writes each scan's
tables right before it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mocoretrieval import data, jpeg_scans
from mocoretrieval.errors import ImageError


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with texture: every band of AC coefficients is non-zero."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    texture = rng.normal(0, 25, (height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)
    return Image.fromarray(np.clip(base + texture[:height, :width], 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def _draft(blob: bytes, side: int = 128) -> tuple[np.ndarray, tuple]:
    img = Image.open(io.BytesIO(blob))
    img.draft("RGB", (side, side))
    img.load()
    return np.asarray(img), img.decoderconfig


# 1,100 x 1,030: Pillow's draft for a 128-px target picks 1/8.
@pytest.mark.parametrize("subsampling", [2, 1, 0], ids=["4:2:0", "4:2:2", "4:4:4"])
def test_rewrite_decodes_to_the_same_pixels_at_one_eighth(subsampling):
    blob = _jpeg(_photo(1100, 1030), progressive=True, subsampling=subsampling)
    lean = jpeg_scans.eighth_scale_scans(blob)
    assert lean is not None and len(lean) < len(blob)
    original, config = _draft(blob)
    rewritten, _ = _draft(lean)
    assert config[0] == 8
    assert original.shape == (129, 138, 3)
    np.testing.assert_array_equal(rewritten, original)


def test_grayscale_progressive_jpeg():
    blob = _jpeg(_photo(1100, 1030).convert("L"), progressive=True)
    lean = jpeg_scans.eighth_scale_scans(blob)
    assert lean is not None
    np.testing.assert_array_equal(_draft(lean)[0], _draft(blob)[0])


def test_nothing_to_gain_or_not_understood_gives_none():
    photo = _photo(1100, 1030)
    progressive = _jpeg(photo, progressive=True)
    assert jpeg_scans.eighth_scale_scans(_jpeg(photo)) is None  # baseline: one pass
    assert jpeg_scans.eighth_scale_scans(progressive[: len(progressive) // 2]) is None
    assert jpeg_scans.eighth_scale_scans(progressive[:-2]) is None  # no end-of-image marker
    assert jpeg_scans.eighth_scale_scans(b"GIF89a" + progressive[2:]) is None
    with_restarts = _jpeg(photo, progressive=True, restart_marker_blocks=4)
    assert b"\xff\xdd" in with_restarts
    assert jpeg_scans.eighth_scale_scans(with_restarts) is None


def test_load_image_takes_the_rewrite(tmp_path, monkeypatch):
    path = tmp_path / "p.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the orientation must survive the rewrite
    path.write_bytes(_jpeg(_photo(1100, 1030), progressive=True, exif=exif.tobytes()))
    calls = []
    rewrite = jpeg_scans.eighth_scale_scans
    monkeypatch.setattr(jpeg_scans, "eighth_scale_scans", lambda b: calls.append(1) or rewrite(b))
    fast = np.asarray(data.load_image(path, 128))
    assert calls == [1]
    monkeypatch.setattr(data, "MAX_REWRITE_BYTES", 0)
    slow = np.asarray(data.load_image(path, 128))
    assert calls == [1]
    assert fast.shape == (138, 129, 3)  # EXIF orientation 6: portrait
    np.testing.assert_array_equal(fast, slow)
    # A scale other than 1/8 reads every coefficient: no rewrite.
    data.load_image(path, 300)
    assert calls == [1]


def test_truncated_progressive_jpeg_is_still_reported(tmp_path):
    blob = _jpeg(_photo(1100, 1030), progressive=True)
    path = tmp_path / "cut.jpg"
    path.write_bytes(blob[: len(blob) * 3 // 4])
    with pytest.raises(ImageError) as e:
        data.load_image(path, 128)
    assert e.value.reason == "truncated"
