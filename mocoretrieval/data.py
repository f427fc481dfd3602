"""Decoding one image file robustly into RGB, fast (finding them is :mod:`.walk`'s part)."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import formats, jpeg_scans
from .errors import ImageError

logger = logging.getLogger(__name__)

# Colour modes holding an alpha channel; they are composited on white, the usual page colour,
# rather than dropping alpha (which would reveal whatever the transparent pixels hold).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# Bytes per pixel of the decoded image, by Pillow mode (unknown modes count 4). The pixel
# limit alone lets a 32-bit float image take 4/3 the memory of an RGB one at the same count.
_MODE_BYTES = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "La": 2,
    "PA": 2,
    "I;16": 2,
    "I;16L": 2,
    "I;16B": 2,
    "I;16N": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
}
# The most bytes one decode may take: an RGB image at Pillow's pixel limit (about 270 MB).
MAX_DECODE_BYTES = 3 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
# Progressive JPEGs up to this size are read into memory and rewritten for a 1/8-scale decode
# (:mod:`.jpeg_scans`): the same pixels, 2.5-3.5x faster on 4-15 MPix wallpapers.
MAX_REWRITE_BYTES = 64 << 20
# Stored thumbnails are viewed in a ~170 px gallery cell; 85 is Pillow's "visually near
# lossless" range and keeps a 320 px JPEG around 15-25 kB.
THUMBNAIL_QUALITY = 85


# --- decoding -----------------------------------------------------------------------------


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    # Pillow's own I/F -> L conversion clips at 255, which turns most 16-bit images white;
    # rescale to 8 bits instead: 16-bit range when values exceed 255, [0, 1] floats to [0, 255].
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.size and arr.max() > 255.0:
            arr = arr / 257.0
    else:
        arr = arr.astype(np.float32)
        if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts an image of any Pillow mode to RGB; transparency is composited on white."""
    has_key = "transparency" in img.info and img.mode in ("P", "L", "RGB")  # a colour key
    if img.mode == "RGB" and not has_key:
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_l(img)
    if has_key or img.mode in _ALPHA_MODES:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.getchannel("A"))
        return out
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. LAB, which Pillow only converts through ImageCms
        raise ImageError(f"unsupported colour mode {img.mode}") from e


def failure_reason(e: BaseException) -> str:
    """A short human reason for a decoding failure (what a skipped file is listed with)."""
    if isinstance(e, FileNotFoundError):
        return "vanished"
    if isinstance(e, PermissionError):
        return "unreadable: permission denied"
    if isinstance(e, IsADirectoryError):
        return "not a file"
    if isinstance(e, Image.DecompressionBombError):
        m = _BOMB_PIXELS.search(str(e))
        return f"decompression bomb ({m.group(1) if m else '?'} pixels)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image"
    text = str(e)
    if isinstance(e, OSError):
        if "truncated" in text.lower():
            return "truncated"
        if e.errno is not None:
            return f"unreadable: {(e.strerror or os.strerror(e.errno)).lower()}"
    if isinstance(e, (EOFError,)) or "truncated" in text.lower():
        return "truncated"
    text = text.splitlines()[0] if text else type(e).__name__
    return f"corrupt: {text[:80]}"


def _reduced(img: Image.Image, min_side: int | None) -> Image.Image:
    if min_side and min(img.size) >= 2 * min_side:
        # What draft mode cannot do (other formats, JPEGs past 1/8): an integer box
        # reduction, cheap, keeping the short side >= min_side for the resize that follows.
        img = img.reduce(min(img.size) // min_side)
    return img


def _eighth_scale(f: BinaryIO, img: Image.Image, min_side: int) -> Image.Image:
    """``img``, a progressive JPEG in 1/8 draft mode, opened from its lean rewrite if it has one."""
    f.seek(0)
    lean = jpeg_scans.eighth_scale_scans(f.read())
    if lean is None:
        return img
    fast = Image.open(io.BytesIO(lean))
    fast.draft("RGB", (min_side, min_side))
    return fast


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decodes an image file into RGB, fast and defensively.

    JPEGs are decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain while
    keeping the short side at least ``min_side`` (measured here on 4 MPix files: about 4x faster
    for baseline JPEGs, 1.5x for progressive ones, whose entropy decoding is not scaled). A
    progressive JPEG drafted at 1/8 is decoded from a rewrite without the AC coefficients that
    scale does not read (:mod:`.jpeg_scans`): the same pixels, a few times faster.
    Any image still twice ``min_side`` or more is then box-reduced by an integer factor, so
    that the short side ends between ``min_side`` and twice it.
    EXIF orientation is applied; GIFs and other animations give their first frame; every mode
    becomes RGB (see :func:`to_rgb`). Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) is enforced as an error, at its warning threshold rather
    than at twice it, so that a suspicious file is skipped instead of decoded. Camera RAW files
    are rendered by :func:`.formats.load_raw` (embedded preview, else half-size demosaic).

    Args:
        path: the image file.
        min_side: the smallest short side the caller needs (e.g. the encoder's resize size);
            None decodes at full size.

    Raises:
        ImageError: the file cannot be used; ``reason`` says why in a few words.
    """
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO (or a device) named like an image must not wait for a
        # writer that never comes; anything but a regular file is refused before reading.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(
                    "not a file" if stat.S_ISDIR(st.st_mode) else "not a regular file", path
                )
            os.set_blocking(fd, True)
            if st.st_size == 0:
                raise ImageError("empty file", path)
            formats.check_readable(path)  # e.g. HEIC without pillow-heif: says what to install
            if formats.is_raw_name(path):  # camera RAW: LibRaw renders it, not Pillow
                return _reduced(to_rgb(formats.load_raw(f, min_side)), min_side)
            # Pillow warns about odd but usable files (corrupt EXIF, palette transparency, the
            # bomb threshold): per-file noise in a bulk run, so it goes to the debug log.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                img = Image.open(f)
                limit = Image.MAX_IMAGE_PIXELS
                pixels = img.width * img.height
                if limit is not None and pixels > limit:
                    raise ImageError(f"decompression bomb ({pixels} pixels)", path)
                if min_side and img.format == "JPEG":
                    img.draft("RGB", (min_side, min_side))
                    if (
                        img.decoderconfig[:1] == (8,)
                        and img.info.get("progressive")
                        and st.st_size <= MAX_REWRITE_BYTES
                    ):
                        img = _eighth_scale(f, img, min_side)
                n_bytes = img.width * img.height * _MODE_BYTES.get(img.mode, 4)
                if n_bytes > MAX_DECODE_BYTES:
                    raise ImageError(f"too large to decode ({n_bytes / 1e6:.0f} MB)", path)
                img.load()
                try:
                    ImageOps.exif_transpose(img, in_place=True)
                except Exception as e:  # noqa: BLE001 - bad EXIF leaves the pixels usable
                    logger.debug("%s: EXIF orientation ignored: %s", path, e)
                img = to_rgb(img)
            for w in caught:
                logger.debug("%s: %s", path, w.message)
        return _reduced(img, min_side)
    except ImageError as e:
        if e.path is None:
            raise ImageError(e.reason, path) from e
        raise
    except FileNotFoundError:
        raise ImageError("broken link" if os.path.islink(path) else "vanished", path) from None
    except MemoryError:
        raise ImageError("too large to decode in memory", path) from None
    except Exception as e:  # Pillow raises many types on malformed data
        raise ImageError(failure_reason(e), path) from e


def encode_thumbnail(img: Image.Image, side: int, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """A baseline JPEG of ``img`` fitting a ``side`` square (never enlarged); ``img`` is modified.

    Made from an image already decoded (and reduced) for the model, it costs a few ms, while
    decoding the original again for the app costs up to hundreds of ms for a progressive JPEG.
    """
    # reducing_gap=1: a box reduction by the largest integer factor first, then bicubic for
    # the rest; 0.45 ms instead of 2.3 ms from a 640 x 400 draft decode, and alike to the eye.
    img.thumbnail((side, side), Image.BICUBIC, reducing_gap=1.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
