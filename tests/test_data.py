"""The file walk and the robust decoder: order, filters, every colour mode, every broken file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocoretrieval.data import encode_thumbnail, load_image, to_rgb
from mocoretrieval.decode_items import ImageFileDataset, collate
from mocoretrieval.errors import ImageError, MoCoRetrievalError
from mocoretrieval.walk import IMAGE_EXTENSIONS, scan_images, walk_images


def _texture(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(base).resize((w, h), Image.BILINEAR))


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


# --- walk ---------------------------------------------------------------------------------


def test_walk_finds_every_extension_in_any_case_sorted(tmp_path):
    names = ["b.JPG", "a.jpeg", "c.Png", "d.webp", "e.BMP", "f.gif", "g.tif", "h.TIFF", "i.jpg"]
    names.append("movie.MP4")  # videos are walked too (tests/test_video.py)
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    for n in ["notes.txt", "sidecar.xmp", "jpg", "movie.srt"]:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "z" / "y").mkdir(parents=True)
    (tmp_path / "z" / "y" / "deep.jpg").write_bytes(b"x")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_dir" / "k.png").write_bytes(b"x")
    found = walk_images(tmp_path)
    assert found == sorted(names + ["z/y/deep.jpg", "a_dir/k.png"])
    assert walk_images(str(tmp_path)) == found  # str or Path, same answer
    # HEIF, AVIF and camera RAW: tests/test_formats.py.
    assert {n.split(".")[-1].lower() for n in names} <= IMAGE_EXTENSIONS


def test_walk_skips_hidden_and_excluded_folders(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.jpg").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.jpg").write_bytes(b"x")
    (tmp_path / "keep" / ".c.jpg").write_bytes(b"x")
    index_dir = tmp_path / ".mocoretrieval"
    index_dir.mkdir()
    (index_dir / "thumb.jpg").write_bytes(b"x")
    other = tmp_path / "my_index"
    other.mkdir()
    (other / "d.png").write_bytes(b"x")
    assert walk_images(tmp_path, exclude=[other]) == ["keep/a.jpg"]
    assert walk_images(tmp_path) == ["keep/a.jpg", "my_index/d.png"]


def test_walk_skips_names_that_are_not_utf8_with_a_warning(tmp_path, caplog):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    try:
        (tmp_path / "café.jpg").write_bytes(b"x")  # UTF-8: kept
        open(os.fsencode(tmp_path) + b"/caf\xe9.jpg", "wb").close()  # Latin-1 bytes
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    with caplog.at_level("WARNING", logger="mocoretrieval.data"):
        assert walk_images(tmp_path) == ["café.jpg", "ok.jpg"]
    assert "not valid UTF-8" in caplog.text


def test_walk_survives_symlink_loops(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "a" / "x.jpg", tmp_path / "link.jpg")
    assert walk_images(tmp_path) == ["a/x.jpg", "link.jpg"]
    assert walk_images(tmp_path, follow_symlinks=True) == ["a/x.jpg", "link.jpg"]


def test_walk_of_a_missing_folder_raises(tmp_path):
    with pytest.raises(MoCoRetrievalError, match="not a folder"):
        walk_images(tmp_path / "nope")


# --- colour modes -------------------------------------------------------------------------


def _modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(_texture(20, 10))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent: must come out white
    pal = rgb.convert("P")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    i16 = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(np.uint16))
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "LA": rgb.convert("LA"),
        "P": pal,
        "P+transparency": pal_t,
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": i16,
        "I": i16.convert("I"),
        "F": Image.fromarray(np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_becomes_rgb(mode):
    out = to_rgb(_modes()[mode])
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparency_is_composited_on_white():
    assert np.array(to_rgb(_modes()["RGBA"])).min() == 255


def test_colour_key_transparency_is_composited_on_white(tmp_path):
    img = Image.new("RGB", (6, 4), (10, 20, 30))
    img.putpixel((0, 0), (200, 0, 0))
    path = _save(tmp_path / "key.png", img, transparency=(10, 20, 30))
    out = np.array(load_image(path))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[3, 5]) == (255, 255, 255)


def test_16_bit_is_rescaled_not_clipped():
    arr = np.array(to_rgb(_modes()["I;16"]))[..., 0]
    assert 0 < arr.mean() < 255 and arr.max() > 200 and arr.min() < 10


@pytest.mark.parametrize(
    "ext, mode",
    [
        ("png", "RGBA"),
        ("png", "LA"),
        ("png", "P+transparency"),
        ("png", "I;16"),
        ("gif", "P"),
        ("tiff", "CMYK"),
        ("jpg", "CMYK"),
        ("bmp", "1"),
        ("webp", "RGBA"),
        ("tif", "F"),
    ],
)
def test_saved_files_of_every_mode_load_as_rgb(tmp_path, ext, mode):
    img = _modes()[mode]
    kwargs = {"transparency": 0} if mode == "P+transparency" else {}
    path = _save(tmp_path / f"x.{ext}", img, **kwargs)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_corrupt_exif_keeps_the_pixels_and_stays_quiet(tmp_path, recwarn):
    exif = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"  # IFD offset past the end of the block
    path = _save(tmp_path / "bad_exif.jpg", Image.fromarray(_texture(40, 20)), exif=exif)
    assert load_image(path).size == (40, 20)
    assert not [w for w in recwarn if "EXIF" in str(w.message)]


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


# --- EXIF and draft -----------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_texture(80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path / "rot.jpg", img, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (80, 40)
    assert load_image(path).size == (40, 80)
    assert load_image(path, min_side=10).size == (40 // 4, 80 // 4)  # with draft mode too


def test_jpeg_draft_mode_keeps_the_short_side(tmp_path):
    path = _save(tmp_path / "big.jpg", Image.fromarray(_texture(1600, 1000)), quality=90)
    full = load_image(path)
    assert full.size == (1600, 1000)
    small = load_image(path, min_side=224)
    # 1000 // 224 = 4 -> libjpeg scales by 1/4, the largest power of two keeping >= 224.
    assert small.size == (400, 250)
    assert min(load_image(path, min_side=300).size) >= 300
    assert load_image(path, min_side=1000).size == (1600, 1000)
    # DCT-domain scaling agrees with a proper downscale of the full decode.
    ref = np.asarray(full.resize(small.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - ref).mean() < 4


def test_other_formats_are_box_reduced(tmp_path):
    path = _save(tmp_path / "big.png", Image.fromarray(_texture(800, 500)))
    assert load_image(path).size == (800, 500)
    assert load_image(path, min_side=100).size == (160, 100)  # reduced by 500 // 100 = 5
    assert load_image(path, min_side=260).size == (800, 500)  # 500 < 2 * 260: left alone
    huge = _save(tmp_path / "huge.jpg", Image.fromarray(_texture(4000, 2400)))
    # Draft mode stops at 1/8 (500 x 300); the reduction takes it the rest of the way.
    assert load_image(huge, min_side=100).size == (167, 100)


# --- broken files -------------------------------------------------------------------------


def _jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_texture(w, h)).save(buf, "JPEG")
    return buf.getvalue()


def make_broken_files(folder: Path) -> dict[str, str]:
    """Writes one broken file of each kind; returns {relative path: expected reason prefix}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("these are not the pixels you are looking for\n")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    # A valid PNG whose compressed pixel data is zeroed out: the header reads, the decode fails.
    buf = io.BytesIO()
    Image.fromarray(_texture(64, 48)).save(buf, "PNG")
    corrupt = bytearray(buf.getvalue())
    at = corrupt.find(b"IDAT") + 20
    corrupt[at : at + 20] = bytes(20)
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    return {
        "zero.jpg": "empty file",
        "text.jpg": "not an image",
        "truncated.jpg": "truncated",
        "corrupt.png": "corrupt: ",
    }


def test_each_broken_file_raises_image_error_with_a_reason(tmp_path):
    expected = make_broken_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name, min_side=32)
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert info.value.reason and len(info.value.reason) <= 100
        assert info.value.path == str(tmp_path / name)
        assert name in str(info.value)


def test_vanished_file(tmp_path):
    with pytest.raises(ImageError, match="vanished"):
        load_image(tmp_path / "gone.jpg")


def test_broken_link(tmp_path):
    os.symlink(tmp_path / "moved_away.jpg", tmp_path / "link.jpg")
    assert walk_images(tmp_path) == []  # issue 13: listed by scan_images with its reason
    assert scan_images(tmp_path).problems == {"link.jpg": "broken link"}
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "link.jpg")
    assert info.value.reason == "broken link"


def test_directory_named_like_an_image(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path / "album.jpg")


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Writes a good JPEG the process may not read; returns the expected skip reason.

    chmod 000 stops everyone but root, and tests often run as root: then the OS refusal is
    simulated by an ``open`` that raises what the OS would (forked workers inherit it).
    """
    path.write_bytes(_jpeg_bytes())
    path.chmod(0)
    if os.access(path, os.R_OK):
        import builtins

        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        real_os_open = os.open

        def refusing_os_open(file, *args, **kwargs):  # load_image opens with O_NONBLOCK
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_os_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
        monkeypatch.setattr(os, "open", refusing_os_open)
    return "unreadable: permission denied"


def test_unreadable_file(tmp_path, monkeypatch):
    reason = make_unreadable(tmp_path / "secret.jpg", monkeypatch)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "secret.jpg")
    assert info.value.reason == reason


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "bomb.png", Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # Pillow's warning threshold
    with pytest.raises(ImageError, match=r"decompression bomb \(10000 pixels\)"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # past twice it, Pillow's own error
    with pytest.raises(ImageError, match=r"decompression bomb \(10000 pixels\)"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)
    assert load_image(path).size == (100, 100)


# --- dataset ------------------------------------------------------------------------------


def test_dataset_and_collate_keep_failures_aside(tmp_path):
    import torch
    from torchvision.transforms.functional import to_tensor

    make_broken_files(tmp_path)
    _save(tmp_path / "good.png", Image.fromarray(_texture(8, 8)))
    rel = walk_images(tmp_path)
    ds = ImageFileDataset(tmp_path, rel, transform=to_tensor, min_side=5)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items)
    assert [rel[i] for i in batch.indices] == ["good.png"]
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (1, 3, 8, 8)
    assert sorted(rel[i] for i, _ in batch.failed) == sorted(set(rel) - {"good.png"})
    assert collate([items[0]]).images is None
    assert batch.thumbnails == []  # none asked for


def test_dataset_makes_jpeg_thumbnails_from_the_decoded_image(tmp_path):
    from torchvision.transforms.functional import to_tensor

    _save(tmp_path / "wide.png", Image.fromarray(_texture(800, 400)))
    _save(tmp_path / "small.png", Image.fromarray(_texture(60, 30)))
    _save(tmp_path / "bad.jpg", Image.new("RGB", (1, 1)))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rel = walk_images(tmp_path)

    def transform(img: Image.Image):
        return to_tensor(img.resize((8, 8)))

    ds = ImageFileDataset(tmp_path, rel, transform=transform, min_side=100, thumbnail_size=128)
    batch = collate([ds[i] for i in range(len(ds))])
    assert [rel[i] for i in batch.indices] == ["small.png", "wide.png"]
    sizes = []
    for blob in batch.thumbnails:
        with Image.open(io.BytesIO(blob)) as thumb:
            assert thumb.format == "JPEG" and thumb.mode == "RGB"
            sizes.append(thumb.size)
    # wide.png is reduced to 400x200 for min_side=100, then fitted into 128; small.png is kept.
    assert sizes == [(60, 30), (128, 64)]
    assert batch.images.shape == (2, 3, 8, 8)


def test_encode_thumbnail_never_enlarges():
    blob = encode_thumbnail(Image.fromarray(_texture(20, 10)), 320)
    assert Image.open(io.BytesIO(blob)).size == (20, 10)
