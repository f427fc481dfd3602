"""Seeded edited copies of images, the queries of copy detection (``mocoretrieval eval copies``).

Each original gets one copy per edit kind (that edit alone) and one ``combined`` copy (the
preset's whole chain, grayscale, flip and overlay each with its probability). Every copy's
parameters come from a generator seeded by (seed, original's path, kind): the same seed gives
the same copies, whatever the other files, the order or the machine. docs/eval.md tabulates the
presets.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from .data import load_image
from .errors import ImageError, MoCoRetrievalError

# Copies are made from the original at this short side at most: a web-sized version, as copies
# usually are. At full size (2-15 MPix) a 30% downscale would still exceed a 224-pixel model's
# input, and so change nothing the model sees.
EDIT_SIDE = 512


@dataclass(frozen=True)
class Preset:
    """The random range of every edit; each copy draws its own values uniformly in them.

    Attributes:
        crop_area: fraction of the area a crop keeps (aspect ratio within 3/4..4/3 of the
            image's, at a random place).
        scale: factor on each side of a downscale (bicubic).
        jpeg_quality: quality of a JPEG re-encode.
        brightness: brightness changes by a factor within 1 +- this.
        contrast: contrast changes by a factor within 1 +- this.
        saturation: factor on saturation.
        rotation: degrees either way (corners filled black).
        grayscale: probability of grayscale in a combined copy.
        flip: probability of a horizontal flip in a combined copy.
        overlay: probability of a caption and a sticker in a combined copy; 0 leaves the
            ``overlay`` kind out.
    """

    crop_area: tuple[float, float]
    scale: tuple[float, float]
    jpeg_quality: tuple[int, int]
    brightness: float
    contrast: float
    saturation: tuple[float, float]
    rotation: float
    grayscale: float
    flip: float
    overlay: float = 0.0


PRESETS = {
    "light": Preset((0.80, 0.95), (0.5, 0.9), (60, 90), 0.1, 0.1, (0.8, 1.2), 3, 0.1, 0.1),
    # The standard of issue 11: light enough that a person still calls it the same photo.
    "standard": Preset((0.60, 0.90), (0.3, 0.7), (25, 60), 0.3, 0.3, (0.5, 1.5), 8, 0.2, 0.3),
    "strong": Preset((0.35, 0.70), (0.2, 0.5), (10, 35), 0.5, 0.5, (0.2, 2.0), 15, 0.3, 0.5, 1.0),
}
EDIT_KINDS = ("crop", "downscale", "jpeg", "color", "grayscale", "flip", "rotate", "overlay")
COMBINED = "combined"
_CAPTIONS = ("(c) 2026 photo", "#holiday", "lol", "SALE -50%", "repost", "my trip!!")


@dataclass(frozen=True)
class EditedCopy:
    """One generated query: ``path`` (relative to the copies' folder) is ``original`` edited."""

    path: str
    original: str
    kind: str


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MoCoRetrievalError(f"unknown transforms {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def kinds_of(preset: Preset) -> tuple[str, ...]:
    """The edit kinds a preset makes copies of, ``combined`` last."""
    kinds = tuple(k for k in EDIT_KINDS if k != "overlay" or preset.overlay > 0)
    return (*kinds, COMBINED)


def _rng(seed: int, original: str, kind: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(original.encode()), zlib.crc32(kind.encode())])


def _crop(img: Image.Image, area: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    a = rng.uniform(*area)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = max(1, round(img.width * min(1.0, math.sqrt(a * ratio))))
    h = max(1, round(img.height * min(1.0, math.sqrt(a / ratio))))
    left = int(rng.integers(0, img.width - w + 1))
    top = int(rng.integers(0, img.height - h + 1))
    return img.crop((left, top, left + w, top + h))


def _downscale(img: Image.Image, scale: tuple[float, float], rng) -> Image.Image:
    s = rng.uniform(*scale)
    size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    return img.resize(size, Image.BICUBIC)


def _color(img: Image.Image, preset: Preset, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(
        1 + rng.uniform(-preset.brightness, preset.brightness)
    )
    img = ImageEnhance.Contrast(img).enhance(1 + rng.uniform(-preset.contrast, preset.contrast))
    return ImageEnhance.Color(img).enhance(rng.uniform(*preset.saturation))


def _rotate(img: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    return img.rotate(rng.uniform(-degrees, degrees), Image.BICUBIC, fillcolor=(0, 0, 0))


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption in a random colour and a smiley sticker (drawn, so no emoji font is needed)."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    side = min(img.size)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    font = ImageFont.load_default(size=max(8, side // 8))
    caption = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    xy = (
        int(rng.integers(0, max(1, img.width // 2))),
        int(rng.integers(0, max(1, img.height - side // 6))),
    )
    draw.text(
        xy, caption, fill=colour, font=font, stroke_width=max(1, side // 100), stroke_fill=(0, 0, 0)
    )
    d = max(6, side // 5)
    x, y = int(rng.integers(0, img.width - d + 1)), int(rng.integers(0, img.height - d + 1))
    draw.ellipse((x, y, x + d, y + d), fill=(255, 204, 0), outline=(0, 0, 0))
    e = d // 8
    for ex in (x + d // 3, x + 2 * d // 3):
        draw.ellipse((ex - e, y + d // 3 - e, ex + e, y + d // 3 + e), fill=(0, 0, 0))
    draw.arc(
        (x + d // 4, y + d // 3, x + 3 * d // 4, y + 3 * d // 4),
        20,
        160,
        fill=(0, 0, 0),
        width=max(1, e),
    )
    return img


def edit(
    img: Image.Image, kind: str, preset: Preset, rng: np.random.Generator
) -> tuple[Image.Image, int | None]:
    """``img`` (RGB) edited as ``kind`` says; returns the image and the JPEG quality to save it
    with (None: lossless, so that only the edit shows)."""
    if kind == "crop":
        return _crop(img, preset.crop_area, rng), None
    if kind == "downscale":
        return _downscale(img, preset.scale, rng), None
    if kind == "jpeg":
        return img, int(rng.integers(preset.jpeg_quality[0], preset.jpeg_quality[1] + 1))
    if kind == "color":
        return _color(img, preset, rng), None
    if kind == "grayscale":
        return ImageOps.grayscale(img).convert("RGB"), None
    if kind == "flip":
        return ImageOps.mirror(img), None
    if kind == "rotate":
        return _rotate(img, preset.rotation, rng), None
    if kind == "overlay":
        return _overlay(img, rng), None
    if kind != COMBINED:
        raise MoCoRetrievalError(f"unknown edit {kind!r}; choose one of {', '.join(EDIT_KINDS)}")
    # The order a copy goes through in the wild: cut, turned, filtered, captioned, resized
    # for the web, re-encoded. Every draw happens whatever its outcome, so each edit's
    # parameters do not depend on whether another edit was applied.
    img = _rotate(_crop(img, preset.crop_area, rng), preset.rotation, rng)
    flip, gray, over = rng.random(3)
    img = ImageOps.mirror(img) if flip < preset.flip else img
    img = _color(img, preset, rng)
    img = ImageOps.grayscale(img).convert("RGB") if gray < preset.grayscale else img
    overlaid = _overlay(img, rng)
    img = overlaid if over < preset.overlay else img
    img = _downscale(img, preset.scale, rng)
    return img, int(rng.integers(preset.jpeg_quality[0], preset.jpeg_quality[1] + 1))


def web_sized(img: Image.Image, side: int = EDIT_SIDE) -> Image.Image:
    """``img`` with its short side brought down to ``side`` (never enlarged)."""
    short = min(img.size)
    if short <= side:
        return img
    s = side / short
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)


def make_copies(
    root: str | Path,
    originals: Sequence[str],
    out_dir: str | Path,
    preset: str = "standard",
    seed: int = 0,
    limit: int | None = None,
) -> tuple[list[EditedCopy], list[tuple[str, str]]]:
    """Writes the edited copies of ``originals`` (paths relative to ``root``) under ``out_dir``.

    Args:
        limit: stop after this many originals have their copies (unreadable ones do not count).

    Returns:
        The copies, by original then kind, and ``(original, reason)`` for each original that
        could not be read (it gets no copies).
    """
    settings = get_preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copies: list[EditedCopy] = []
    skipped: list[tuple[str, str]] = []
    done = 0
    for i, original in enumerate(originals):
        if limit is not None and done >= limit:
            break
        try:
            img = web_sized(load_image(Path(root) / original, min_side=EDIT_SIDE))
        except ImageError as e:
            skipped.append((original, e.reason))
            continue
        for kind in kinds_of(settings):
            copy, quality = edit(img, kind, settings, _rng(seed, original, kind))
            name = f"{i:05d}-{kind}.{'jpg' if quality else 'png'}"
            if quality:
                copy.save(out_dir / name, quality=quality)
            else:
                copy.save(out_dir / name, compress_level=1)  # lossless, and fast to write
            copies.append(EditedCopy(name, original, kind))
        done += 1
    return copies, skipped
