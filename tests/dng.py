"""A minimal DNG writer for tests and benchmarks: a CFA mosaic and an embedded JPEG preview.

Written from the TIFF 6.0 and DNG 1.4 specifications, so that tests need no downloaded camera
files and no extra package: IFD 0 holds the preview (NewSubFileType 1, JPEG-compressed, as
cameras write it) and the DNG tags LibRaw needs to call the file a DNG (DNGVersion,
UniqueCameraModel, ColorMatrix1, AsShotNeutral); its one SubIFD holds the raw image
(NewSubFileType 0), an uncompressed 16-bit RGGB Bayer mosaic with its black and white levels.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _SRATIONAL = 1, 2, 3, 4, 5, 10
_FORMATS = {_BYTE: "B", _ASCII: "s", _SHORT: "H", _LONG: "I", _RATIONAL: "II", _SRATIONAL: "ii"}
WHITE_LEVEL = 4095  # a 12-bit sensor
# XYZ (D65) -> linear sRGB (IEC 61966-2-1): as ColorMatrix1, the mosaic holds linear sRGB.
XYZ_TO_SRGB = (3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570)


def _value(kind: int, values) -> tuple[int, bytes]:
    """``(count, little-endian bytes)`` of a tag's values."""
    if kind == _ASCII:
        data = values.encode("ascii") + b"\0"
        return len(data), data
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if kind in (_RATIONAL, _SRATIONAL):  # given as floats, stored as (numerator, 10000)
        flat = [x for v in values for x in (round(v * 10000), 10000)]
        return len(values), struct.pack(f"<{len(flat)}{_FORMATS[kind][0]}", *flat)
    return len(values), struct.pack(f"<{len(values)}{_FORMATS[kind]}", *values)


def _ifd(entries: dict[int, tuple[int, object]], at: int) -> bytes:
    """One IFD written at offset ``at``, its long values right after it; no next IFD."""
    entries = dict(sorted(entries.items()))
    extra_at = at + 2 + 12 * len(entries) + 4
    head, extra = [struct.pack("<H", len(entries))], b""
    for tag, (kind, values) in entries.items():
        count, data = _value(kind, values)
        if len(data) <= 4:
            head.append(struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0"))
        else:
            head.append(struct.pack("<HHII", tag, kind, count, extra_at + len(extra)))
            extra += data + b"\0" * (len(data) % 2)  # values start on a word boundary
    return b"".join(head) + struct.pack("<I", 0) + extra


def bayer(rgb: np.ndarray) -> np.ndarray:
    """The RGGB mosaic a sensor would record of ``rgb`` (H, W, 3 floats in [0, 1])."""
    h, w, _ = rgb.shape
    cfa = np.empty((h, w), np.float64)
    cfa[0::2, 0::2] = rgb[0::2, 0::2, 0]
    cfa[0::2, 1::2] = rgb[0::2, 1::2, 1]
    cfa[1::2, 0::2] = rgb[1::2, 0::2, 1]
    cfa[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return np.round(cfa * WHITE_LEVEL).astype("<u2")


def write_dng(
    path: Path,
    rgb: np.ndarray,
    preview: Image.Image | None = None,
    orientation: int = 1,
    jpeg: bytes | None = None,
) -> Path:
    """Writes ``rgb`` (H, W, 3 floats in [0, 1], even H and W) as a DNG; returns ``path``.

    Args:
        path: the file to write.
        rgb: the scene; the file holds its Bayer mosaic (see :func:`bayer`).
        preview: the embedded JPEG preview; None makes a 160 px one from ``rgb``.
        orientation: the TIFF/EXIF Orientation tag (1 upright, 6 rotate 90 degrees clockwise).
        jpeg: the preview's bytes as stored, instead of ``preview`` encoded (e.g. a broken one);
            ``preview`` still gives its size.
    """
    h, w, _ = rgb.shape
    if preview is None:
        preview = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
        preview.thumbnail((160, 160))
    buf = io.BytesIO()
    preview.convert("RGB").save(buf, "JPEG", quality=90)
    jpeg, raw = jpeg or buf.getvalue(), bayer(rgb).tobytes()
    pw, ph = preview.size

    def ifd0(sub_at: int, jpeg_at: int) -> dict[int, tuple[int, object]]:
        return {
            254: (_LONG, 1),  # NewSubFileType: a reduced-resolution (preview) image
            256: (_LONG, pw),
            257: (_LONG, ph),
            258: (_SHORT, (8, 8, 8)),
            259: (_SHORT, 7),  # Compression: JPEG
            262: (_SHORT, 6),  # PhotometricInterpretation: YCbCr, as JPEG stores it
            271: (_ASCII, "mocoretrieval"),  # Make
            272: (_ASCII, "test DNG"),  # Model
            273: (_LONG, jpeg_at),  # StripOffsets
            274: (_SHORT, orientation),
            277: (_SHORT, 3),  # SamplesPerPixel
            278: (_LONG, ph),  # RowsPerStrip
            279: (_LONG, len(jpeg)),  # StripByteCounts
            284: (_SHORT, 1),  # PlanarConfiguration: chunky
            330: (_LONG, sub_at),  # SubIFDs
            50706: (_BYTE, (1, 4, 0, 0)),  # DNGVersion
            50708: (_ASCII, "mocoretrieval test DNG"),  # UniqueCameraModel
            50721: (_SRATIONAL, XYZ_TO_SRGB),  # ColorMatrix1: the "camera" sees linear sRGB
            50728: (_RATIONAL, (1, 1, 1)),  # AsShotNeutral: white balance already neutral
            50778: (_SHORT, 21),  # CalibrationIlluminant1: D65
        }

    def sub(raw_at: int) -> dict[int, tuple[int, object]]:
        return {
            254: (_LONG, 0),  # NewSubFileType: the main (raw) image
            256: (_LONG, w),
            257: (_LONG, h),
            258: (_SHORT, 16),
            259: (_SHORT, 1),  # uncompressed
            262: (_SHORT, 32803),  # PhotometricInterpretation: CFA
            273: (_LONG, raw_at),
            277: (_SHORT, 1),
            278: (_LONG, h),
            279: (_LONG, len(raw)),
            284: (_SHORT, 1),
            33421: (_SHORT, (2, 2)),  # CFARepeatPatternDim
            33422: (_BYTE, (0, 1, 1, 2)),  # CFAPattern: R G / G B
            50714: (_LONG, 0),  # BlackLevel
            50717: (_LONG, WHITE_LEVEL),  # WhiteLevel
        }

    # Sizes do not depend on the offsets, so one dry run places everything.
    n0 = len(_ifd(ifd0(0, 0), 8))
    sub_at = 8 + n0
    n1 = len(_ifd(sub(0), sub_at))
    jpeg_at = sub_at + n1
    raw_at = jpeg_at + len(jpeg) + len(jpeg) % 2
    data = (
        b"II*\0"
        + struct.pack("<I", 8)
        + _ifd(ifd0(sub_at, jpeg_at), 8)
        + _ifd(sub(raw_at), sub_at)
        + jpeg
        + b"\0" * (len(jpeg) % 2)
        + raw
    )
    Path(path).write_bytes(data)
    return Path(path)
