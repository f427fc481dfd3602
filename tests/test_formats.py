"""HEIC/HEIF, AVIF and camera RAW: found by the walk, decoded to RGB, broken ones skipped with a
reason, and a RAW + JPEG pair counted once. Every file is written by the test (see dng.py)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from dng import write_dng
from PIL import Image

from mocoretrieval import formats
from mocoretrieval.data import load_image
from mocoretrieval.errors import ImageError
from mocoretrieval.walk import scan_images, walk_images

RED, BLUE = (200, 30, 40), (30, 60, 200)
PREVIEW_GREEN = (40, 180, 60)  # a preview colour the RAW scene lacks: says which path ran


def _halves(w: int = 96, h: int = 64) -> Image.Image:
    """Red on the left, blue on the right: colour and orientation in one image."""
    img = Image.new("RGB", (w, h), RED)
    img.paste(BLUE, (w // 2, 0, w, h))
    return img


def _write(img: Image.Image, path: Path, fmt: str) -> Path:
    """Saves ``img``; HEIF straight through pillow-heif, so that a test that fails to register
    the Pillow plugin fails on reading, not writing."""
    if fmt == "HEIF":
        pillow_heif.from_pillow(img).save(path, quality=90)
    else:
        img.save(path, format=fmt, quality=90)
    return path


def _mean(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(img.crop(box), np.float64).reshape(-1, 3).mean(0)


def _scene(w: int = 256, h: int = 192) -> np.ndarray:
    """An orange scene, linear light, with a dark top-left quadrant (shows orientation)."""
    rgb = np.empty((h, w, 3))
    rgb[:] = (0.6, 0.3, 0.1)
    rgb[: h // 2, : w // 2] = 0.02
    return rgb


# --- HEIF and AVIF ------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "ext"), [("HEIF", "heic"), ("AVIF", "avif")])
def test_heif_and_avif_decode_to_rgb_of_the_right_size_and_colour(tmp_path, fmt, ext):
    """Broken on purpose once: without ``register_heif_opener`` in formats.register_plugins,
    the HEIC case fails ("HEIC/HEIF needs pillow-heif"); AVIF is Pillow's own."""
    path = tmp_path / f"photo.{ext}"
    _write(_halves(), path, fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (96, 64)
    # Lossy 4:2:0 coding smears colour across the edge: measure away from it.
    assert np.abs(_mean(img, (4, 4, 40, 60)) - RED).max() < 15
    assert np.abs(_mean(img, (56, 4, 92, 60)) - BLUE).max() < 15


def test_walk_finds_heif_avif_and_raw_in_any_case(tmp_path):
    """Broken on purpose once: with the RAW row removed from formats.FORMATS, this fails."""
    names = ["a.heic", "b.HEIF", "c.hif", "d.avif", "e.dng", "f.CR3", "g.nef", "h.ARW", "i.raf"]
    for n in [*names, "notes.xmp", "subtitles.srt"]:
        (tmp_path / n).write_bytes(b"x")
    assert walk_images(tmp_path) == sorted(names)


@pytest.mark.slow  # a fresh interpreter imports torch: about 5-15 s
def test_a_spawned_process_reads_heic_too(tmp_path):
    """Decode-pool workers may be spawned: importing ``data`` alone must register the plugin.

    Broken on purpose once: with formats.register_plugins called neither at import nor by
    formats.missing, the child fails ("HEIC/HEIF needs pillow-heif")."""
    path = tmp_path / "photo.heic"
    _write(_halves(), path, "HEIF")
    code = (
        "import sys; from mocoretrieval.data import load_image; print(load_image(sys.argv[1]).size)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(96, 64)"


def test_a_missing_plugin_is_a_reason_that_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "photo.heic"
    _write(_halves(), path, "HEIF")
    monkeypatch.setattr(formats, "missing", lambda: {"HEIF": "HEIC/HEIF needs pillow-heif: pip"})
    with pytest.raises(ImageError, match="needs pillow-heif") as info:
        load_image(path)
    assert info.value.path == str(path)


# --- camera RAW ---------------------------------------------------------------------------


def _dng(path: Path, orientation: int = 1, preview_side: int = 120) -> Path:
    """A DNG of :func:`_scene` whose embedded preview is PREVIEW_GREEN, ``preview_side`` tall."""
    preview = Image.new("RGB", (preview_side * 4 // 3, preview_side), PREVIEW_GREEN)
    preview.paste((0, 0, 0), (0, 0, preview.width // 2, preview.height // 2))
    return write_dng(path, _scene(), preview, orientation)


def _dark_corner(img: Image.Image) -> str:
    """Which quadrant of ``img`` is the dark one."""
    w, h = img.size
    boxes = {
        "top-left": (0, 0, w // 2, h // 2),
        "top-right": (w // 2, 0, w, h // 2),
        "bottom-left": (0, h // 2, w // 2, h),
        "bottom-right": (w // 2, h // 2, w, h),
    }
    return min(boxes, key=lambda k: _mean(img, boxes[k]).sum())


@pytest.mark.parametrize(("orientation", "corner"), [(1, "top-left"), (6, "top-right")])
def test_dng_preview_is_used_when_large_enough(tmp_path, orientation, corner):
    """Broken on purpose once each: always demosaicing (the preview skipped) turns the colour
    orange; without ``exif_transpose`` of the preview, orientation 6 is not turned."""
    img = load_image(_dng(tmp_path / "a.dng", orientation, preview_side=120), min_side=100)
    assert img.mode == "RGB"
    assert img.size == ((160, 120) if orientation == 1 else (120, 160))
    assert _dark_corner(img) == corner
    bright = _mean(img, (0, img.height * 3 // 4, img.width, img.height))  # the bottom quarter
    assert np.abs(bright - PREVIEW_GREEN).max() < 6


def test_dng_preview_at_full_size_when_no_size_is_asked(tmp_path):
    """Broken on purpose once: drafting the preview down to RAW_PREVIEW_MIN_SIDE always gives
    800 x 600 here."""
    path = _dng(tmp_path / "a.dng", preview_side=1200)
    assert load_image(path).size == (1600, 1200)
    assert load_image(path, min_side=500).size == (800, 600)  # JPEG draft mode: 1/2 scale


@pytest.mark.parametrize(("orientation", "corner"), [(1, "top-left"), (6, "top-right")])
@pytest.mark.parametrize("min_side", [None, 121])
def test_dng_too_small_a_preview_is_demosaiced_at_half_size(
    tmp_path, orientation, corner, min_side
):
    """``min_side`` None asks for RAW_PREVIEW_MIN_SIDE (512), more than the 120 px preview.

    Broken on purpose once: with the threshold reversed (``>``), the preview is returned and the
    size and colour checks fail."""
    img = load_image(_dng(tmp_path / "a.dng", orientation), min_side=min_side)
    assert img.mode == "RGB"
    assert img.size == ((128, 96) if orientation == 1 else (96, 128))  # half of 256 x 192
    assert _dark_corner(img) == corner
    r, g, b = _mean(img, (0, img.height * 3 // 4, img.width, img.height))
    # The orange scene, as LibRaw renders it (sRGB gamma, auto-brightened): not the preview.
    assert r > 200 and r > g + 40 > b + 80, (r, g, b)


def test_a_broken_preview_falls_back_to_the_sensor_data(tmp_path):
    """Broken on purpose once: without the fallback, the preview's error skips the file."""
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    preview = Image.fromarray(noise)
    buf = io.BytesIO()
    preview.save(buf, "JPEG")
    half = buf.getvalue()[: len(buf.getvalue()) // 2]  # LibRaw hands it over; Pillow refuses it
    path = write_dng(tmp_path / "a.dng", _scene(), preview, jpeg=half)
    img = load_image(path, min_side=64)
    assert img.size == (128, 96)  # half of 256 x 192: demosaiced


def _broken_raw_files(folder: Path) -> dict[str, str]:
    """One broken RAW or HEIC file of each kind -> the expected reason prefix."""
    good = _dng(folder / "good.dng").read_bytes()
    (folder / "garbage.dng").write_bytes(b"this is not a raw file\n" * 20)
    (folder / "truncated.dng").write_bytes(good[: len(good) // 2])  # mid sensor data
    (folder / "empty.nef").write_bytes(b"")
    (folder / "text.cr2").write_text("II*\0 but nothing after the header")
    heic = _write(_halves(), folder / "good.heic", "HEIF").read_bytes()
    (folder / "garbage.heic").write_bytes(b"ftypheic" * 40)
    (folder / "truncated.heic").write_bytes(heic[: len(heic) // 2])
    return {
        "garbage.dng": "not an image",
        "truncated.dng": "truncated",
        "empty.nef": "empty file",
        "text.cr2": "truncated",  # a TIFF header and nothing after it
        "garbage.heic": "not an image",
        "truncated.heic": "not an image",  # pillow-heif cannot even identify it
    }


def test_broken_raw_and_heic_files_raise_image_error_with_a_reason(tmp_path):
    """Like tests/test_data.py's broken files: skipped with a short reason, never a crash.

    Broken on purpose once: without ``except rawpy.LibRawError`` in load_raw, the DNG reasons
    become data._reason's generic "corrupt: b'Unsupported file format...'" and this fails."""
    expected = _broken_raw_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name, min_side=200)  # > the preview: the sensor data is read
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert len(info.value.reason) <= 100
        assert info.value.path == str(tmp_path / name)


def test_a_huge_raw_is_refused_as_a_decompression_bomb(tmp_path, monkeypatch):
    path = _dng(tmp_path / "a.dng")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match=r"decompression bomb \(49152 pixels\)"):
        load_image(path)


# --- RAW + JPEG pairs ---------------------------------------------------------------------


def test_collapse_raw_pairs_keeps_the_rendered_file():
    paths = [
        "IMG_1.CR2",
        "IMG_1.JPG",  # the camera's pair: one photo
        "IMG_2.nef",  # a RAW alone stays
        "a/IMG_1.dng",  # another folder: another photo
        "b/DSCF3.RAF",
        "b/DSCF3.hif",  # RAW + HEIF, as Fujifilm cameras write them
        "c/x.arw",
        "c/x.dng",  # two RAWs and one JPEG of one name: one photo
        "c/x.jpeg",
        "c/y.png",
        "c/y.cr3",  # a PNG is an export, not the camera's picture: both stay
        "d/IMG_1.cr2.jpg",  # "IMG_1.cr2" + ".jpg" is not IMG_1's pair
        "d/IMG_1.cr2",
    ]
    kept, paired = formats.collapse_raw_pairs(paths)
    assert kept == [
        "IMG_1.JPG",
        "IMG_2.nef",
        "a/IMG_1.dng",
        "b/DSCF3.hif",
        "c/x.jpeg",
        "c/y.png",
        "c/y.cr3",
        "d/IMG_1.cr2.jpg",
        "d/IMG_1.cr2",
    ]
    assert paired == {
        "IMG_1.CR2": "IMG_1.JPG",
        "b/DSCF3.RAF": "b/DSCF3.hif",
        "c/x.arw": "c/x.jpeg",
        "c/x.dng": "c/x.jpeg",
    }
    assert formats.collapse_raw_pairs([]) == ([], {})


def test_the_walk_lists_one_file_per_raw_and_jpeg_pair(tmp_path):
    """Broken on purpose once: without collapse_raw_pairs in scan_images, IMG_1.CR2 is listed."""
    for name in ["IMG_1.CR2", "IMG_1.jpg", "IMG_2.CR2", "sub/IMG_1.CR2"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    scan = scan_images(tmp_path)
    assert list(scan.files) == ["IMG_1.jpg", "IMG_2.CR2", "sub/IMG_1.CR2"]
    assert scan.paired == {"IMG_1.CR2": "IMG_1.jpg"}
    assert walk_images(tmp_path) == list(scan.files)


def test_an_index_holds_heic_avif_and_raw_and_one_photo_per_pair(tmp_path, tiny_encoder):
    """End to end, in-process (workers=0): every new format embedded, a RAW+JPEG pair once, a
    broken DNG skipped with its reason."""
    from mocoretrieval import ImageIndex

    root = tmp_path / "photos"
    root.mkdir()
    _write(_halves(), root / "a.heic", "HEIF")
    _write(_halves().transpose(Image.Transpose.FLIP_LEFT_RIGHT), root / "b.avif", "AVIF")
    _dng(root / "c.dng")
    _dng(root / "IMG_1.CR2")  # a DNG named like a Canon RAW: LibRaw reads by content
    _halves(64, 96).save(root / "IMG_1.jpg")
    (root / "d.dng").write_bytes(b"not a raw file" * 10)
    with ImageIndex.build(root, model=tiny_encoder, workers=0) as index:
        assert index.paths() == ["IMG_1.jpg", "a.heic", "b.avif", "c.dng"]
        assert index.info()["skipped"] == {"d.dng": "not an image LibRaw can read"}
        assert index.search(root / "c.dng", k=1)[0].relpath == "c.dng"


def test_decode_pool_workers_read_every_format(tmp_path):
    """The index's decoding path with a worker process (the pool's default start method)."""
    import torch

    from mocoretrieval.decode_items import ImageFileDataset
    from mocoretrieval.decode_pool import decode_batches

    _write(_halves(), tmp_path / "a.heic", "HEIF")
    _write(_halves(), tmp_path / "b.avif", "AVIF")
    _dng(tmp_path / "c.dng")
    (tmp_path / "d.dng").write_bytes(b"not a raw file" * 10)
    rel = walk_images(tmp_path)
    dataset = ImageFileDataset(tmp_path, rel, lambda img: torch.zeros(3, 4, 4), min_side=32)
    ((batch,),) = list(decode_batches(dataset, [list(range(4))], [1], workers=1))  # pool closed
    assert [rel[i] for i in batch.indices] == ["a.heic", "b.avif", "c.dng"]
    assert [(rel[i], reason) for i, reason in batch.failed] == [
        ("d.dng", "not an image LibRaw can read")
    ]
