"""Which image formats are read, by what, and how camera RAW files are rendered.

The choices, each the fewest packages that work:

- JPEG, PNG, WebP, BMP, GIF, TIFF: Pillow itself.
- AVIF: Pillow too. Pillow reads AVIF natively since 11.2, and its wheels carry libavif (the
  dav1d decoder) since 11.3, hence ``pillow>=11.3``. ``pillow-avif-plugin`` is only used if
  installed and this Pillow was built without AVIF; pillow-heif 1.x reads HEIF only.
- HEIC/HEIF: ``pillow-heif`` (libheif with libde265), registered with Pillow when this module
  is imported. :mod:`.data` imports it, so every process that decodes has it registered:
  forked decode workers inherit the registry, spawned ones import ``data`` again.
  pillow-heif applies the file's rotation and mirroring and resets its EXIF orientation, so
  nothing is turned twice.
- Camera RAW (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2, PEF, SRW, ...): ``rawpy`` (LibRaw),
  imported on the first RAW file. :func:`load_raw` takes the camera's embedded JPEG preview
  when its short side is at least the size asked for (:data:`RAW_PREVIEW_MIN_SIDE` when none
  is), since decoding it costs a few ms where demosaicing costs hundreds; else it demosaics at
  half size with the camera's white balance.

A RAW file next to a JPEG (or HEIF) of the same name is the same photo twice; see
:func:`collapse_raw_pairs`.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps, features

from .errors import ImageError
from .video import INSTALL_HINT as VIDEO_INSTALL_HINT
from .video import VIDEO_EXTENSIONS

logger = logging.getLogger(__name__)

# The preview is used for a caller that asks for no size when its short side reaches this:
# above the 320 px stored thumbnails and the usual 224-256 px model inputs.
RAW_PREVIEW_MIN_SIDE = 512


@dataclass(frozen=True)
class Format:
    """One family of image files.

    Attributes:
        name: what users call it.
        extensions: lower-case file extensions, without the dot.
        decoder: what opens it, as a user installs it.
        rendered: a camera's finished picture (a JPEG or HEIF), which stands in for a RAW file
            of the same name (see :func:`collapse_raw_pairs`).
    """

    name: str
    extensions: frozenset[str]
    decoder: str
    rendered: bool = False


# Camera RAW, by maker: Adobe DNG (also phones: Apple ProRAW, Android); Canon; Nikon; Sony;
# Fujifilm; Olympus/OM System; Panasonic, Leica; Pentax; Samsung; Hasselblad, Phase One, Epson,
# Kodak, Leaf, Minolta.
_RAW = frozenset({
    "dng", "cr2", "cr3", "crw", "nef", "nrw", "arw", "srf", "sr2", "raf", "orf", "rw2", "rwl",
    "pef", "srw", "3fr", "iiq", "erf", "kdc", "dcr", "mos", "mrw",
})  # fmt: skip
FORMATS: tuple[Format, ...] = (
    Format("JPEG", frozenset({"jpg", "jpeg"}), "Pillow", rendered=True),
    Format("PNG", frozenset({"png"}), "Pillow"),
    Format("WebP", frozenset({"webp"}), "Pillow"),
    Format("BMP", frozenset({"bmp"}), "Pillow"),
    Format("GIF", frozenset({"gif"}), "Pillow"),
    Format("TIFF", frozenset({"tif", "tiff"}), "Pillow"),
    Format("AVIF", frozenset({"avif"}), "Pillow>=11.3"),
    # .hif: Fujifilm and Canon cameras' name for HEIF.
    Format("HEIF", frozenset({"heic", "heif", "hif"}), "pillow-heif", rendered=True),
    Format("RAW", _RAW, "rawpy"),
    # A few keyframes per video, each its own vector (see :mod:`.video`).
    Format("Video", VIDEO_EXTENSIONS, "PyAV"),
)
_BY_EXTENSION = {ext: fmt for fmt in FORMATS for ext in fmt.extensions}
EXTENSIONS: frozenset[str] = frozenset(_BY_EXTENSION)
RAW_EXTENSIONS: frozenset[str] = _RAW


def _extension(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def format_of(name: str) -> Format | None:
    """The format a file name says, by its extension in any case; None for any other file."""
    return _BY_EXTENSION.get(_extension(name))


def is_raw_name(name: str) -> bool:
    """Whether a file name has a camera RAW extension, in any case."""
    return _extension(name) in RAW_EXTENSIONS


# --- plugins ------------------------------------------------------------------------------


@functools.cache
def register_plugins() -> None:
    """Registers the Pillow plugins of :data:`FORMATS` that are installed; once per process."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        logger.debug("pillow-heif is not installed: HEIC/HEIF files are skipped")
    else:
        register_heif_opener()
    if not features.check_module("avif"):
        try:
            import pillow_avif  # noqa: F401 - registers itself on import
        except ImportError:
            logger.debug("this Pillow reads no AVIF and pillow-avif-plugin is not installed")


@functools.cache
def missing() -> dict[str, str]:
    """Format name -> what to install, for each format this process cannot read."""
    register_plugins()
    opened = {ext[1:] for ext in Image.registered_extensions()}
    out = {}
    if not {"heic", "heif"} <= opened:
        out["HEIF"] = "HEIC/HEIF needs pillow-heif: pip install pillow-heif"
    if "avif" not in opened:
        out["AVIF"] = "AVIF needs Pillow>=11.3 (pip install -U pillow) or pillow-avif-plugin"
    if importlib.util.find_spec("rawpy") is None:
        out["RAW"] = "camera RAW needs rawpy: pip install rawpy"
    if importlib.util.find_spec("av") is None:
        out["Video"] = VIDEO_INSTALL_HINT
    return out


def check_readable(name: str) -> None:
    """Raises :class:`ImageError` naming what to install when ``name``'s format cannot be read
    here; a file the walk lists is then skipped with that reason, not as "not an image"."""
    fmt = format_of(name)
    if fmt is not None and fmt.name in missing():
        raise ImageError(missing()[fmt.name])


# --- camera RAW ---------------------------------------------------------------------------

# LibRaw's orientation codes (``sizes.flip``) as Pillow transposes, for a preview without EXIF.
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def _raw_reason(e: Exception) -> str:
    """A short reason for a LibRaw error, in the words :func:`.data.load_image` uses."""
    import rawpy

    if isinstance(e, rawpy.LibRawFileUnsupportedError):
        return "not an image LibRaw can read"
    if isinstance(e, rawpy.LibRawIOError):  # LibRaw's "unexpected end of file"
        return "truncated"
    if isinstance(e, (rawpy.LibRawTooBigError, rawpy.LibRawUnsufficientMemoryError)):
        return "too large to decode"
    arg = e.args[0] if e.args else ""
    text = arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)  # LibRaw's words
    return f"corrupt: {text[:80] or type(e).__name__}"


def _preview(raw, need: int, draft: bool) -> Image.Image | None:
    """The embedded preview, upright, when its short side is at least ``need``; else None.
    With ``draft``, a JPEG preview is decoded scaled down, its short side kept >= ``need``."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    except rawpy.LibRawError as e:  # a broken preview: the raw data may still be good
        logger.debug("unusable RAW preview: %s", e)
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            img = Image.open(io.BytesIO(thumb.data))
            if min(img.size) < need:
                return None
            if draft:
                img.draft("RGB", (need, need))  # as data.load_image does for JPEG files
            img.load()
        except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors on malformed data
            logger.debug("unusable RAW preview: %s", e)
            return None
        # LibRaw writes the RAW's orientation into the preview's EXIF when the camera did not.
        ImageOps.exif_transpose(img, in_place=True)
        return img
    img = Image.fromarray(np.ascontiguousarray(thumb.data))  # an uncompressed bitmap
    if min(img.size) < need:
        return None
    flip = _FLIP.get(raw.sizes.flip)
    return img.transpose(flip) if flip is not None else img


def load_raw(file: IO[bytes], min_side: int | None = None) -> Image.Image:
    """Renders a camera RAW file as an upright image (RGB or L, as the preview is).

    The embedded JPEG preview is used when its short side is at least ``min_side`` (or
    :data:`RAW_PREVIEW_MIN_SIDE`); else the sensor data is demosaiced at half size (each 2x2
    Bayer block becomes one pixel: 4x fewer pixels, and the sharpest image that costs no
    interpolation) with the camera's white balance, into 8-bit sRGB. LibRaw turns the
    demosaiced image upright itself (``sizes.flip``).

    Args:
        file: the RAW file, open for reading; read whole into memory (LibRaw's buffer input).
        min_side: the smallest short side the caller needs; None takes a preview of
            :data:`RAW_PREVIEW_MIN_SIDE` or more at its full size.

    Raises:
        ImageError: rawpy is not installed, or LibRaw cannot read the file; ``reason`` says why.
    """
    try:
        import rawpy
    except ImportError:
        raise ImageError(missing().get("RAW", "camera RAW needs rawpy")) from None
    try:
        with rawpy.imread(file) as raw:
            pixels = raw.sizes.raw_width * raw.sizes.raw_height
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and pixels > limit:
                raise ImageError(f"decompression bomb ({pixels} pixels)")
            img = _preview(raw, min_side or RAW_PREVIEW_MIN_SIDE, draft=bool(min_side))
            if img is not None:
                return img
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)  # (H, W, 3)
            return Image.fromarray(rgb)
    except rawpy.LibRawError as e:
        raise ImageError(_raw_reason(e)) from e


# --- RAW + JPEG pairs ---------------------------------------------------------------------


def collapse_raw_pairs(paths: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Counts a RAW file and a rendered picture of the same name in one folder as one photo.

    Cameras set to "RAW + JPEG" write ``IMG_0001.CR2`` beside ``IMG_0001.JPG`` (or ``.HIF``):
    one photo, which would otherwise be found twice by every search. The rendered file is kept
    (the camera's own rendering, and cheaper to decode) and the RAW is left out. Names match
    when the folder and the name before the extension are equal; extensions match in any case.

    Args:
        paths: file paths (POSIX, as :func:`.walk.scan_images` lists them).

    Returns:
        ``(kept, paired)``: the paths kept, in the order given, and each RAW path left out ->
        the rendered path that stands for it.
    """
    paths = list(paths)
    rendered: dict[str, str] = {}  # folder/name without extension -> the rendered file
    for p in paths:
        fmt = format_of(p)
        if fmt is not None and fmt.rendered:
            # Of a JPEG and a HEIF sibling, the first in order stands for the RAW.
            rendered.setdefault(os.path.splitext(p)[0], p)
    kept, paired = [], {}
    for p in paths:
        if is_raw_name(p):
            twin = rendered.get(os.path.splitext(p)[0])
            if twin is not None:
                paired[p] = twin
                continue
        kept.append(p)
    return kept, paired


register_plugins()
