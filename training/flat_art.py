"""Procedural flat-colour graphics: training instances like desktop artwork, made in code.

Desktop wallpapers are often vector renders: a few flat or gradient-filled shapes (dunes, bands,
discs, low-poly facets) in a small palette. An encoder trained on photographs has little reason
to tell two of them apart, and its duplicate search then joins different renders (RESULTS.md,
"default encoder probes, round 3": two pastel renders, a dune and ice floes, at >= 0.975). These
pictures add such instances with no licence to track: each is a function of (seed, its number),
so the same arguments give the same bytes, on any machine.

``python -m training.photos flat-art OUT --n 1500`` writes ``OUT/NNNNN.png`` at ``--size``
pixels (tile-sized: a tile folder can hold them as they are).
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageStat

from mocoretrieval.errors import DatasetError

from .tiles import TileReport, building_folder

SUPERSAMPLE = 2  # drawn at twice the size and reduced: anti-aliased edges, as renders have
MIN_STD = 8.0  # grey-level standard deviation under which a picture is blank, and drawn again


def _palette(rng: random.Random) -> list[tuple[int, int, int]]:
    """2-5 colours around a few hues, in one of three moods: pastel, dark or saturated."""
    mood = rng.choice(("pastel", "dark", "vivid"))
    hues = [rng.random() for _ in range(rng.randint(1, 3))]
    colours = []
    for _ in range(rng.randint(2, 5)):
        h = (rng.choice(hues) + rng.gauss(0, 0.04)) % 1.0
        if mood == "pastel":
            s, v = rng.uniform(0.1, 0.5), rng.uniform(0.75, 1.0)
        elif mood == "dark":
            s, v = rng.uniform(0.2, 0.9), rng.uniform(0.05, 0.45)
        else:
            s, v = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
        colours.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)))
    return colours


def _gradient(size: int, a: tuple[int, ...], b: tuple[int, ...], angle: float) -> Image.Image:
    """A linear gradient from ``a`` to ``b`` along ``angle``."""
    ramp = Image.linear_gradient("L").resize((size, size)).rotate(math.degrees(angle))
    return Image.composite(
        Image.new("RGB", (size, size), b), Image.new("RGB", (size, size), a), ramp
    )


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, colour) -> None:
    kind = rng.choice(("polygon", "ellipse", "band", "facets", "stripes"))
    if kind == "polygon":
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.15, 0.8) * size
        n = rng.randint(3, 7)
        angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        draw.polygon(pts, fill=colour)
    elif kind == "ellipse":
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        rx, ry = rng.uniform(0.05, 0.6) * size, rng.uniform(0.05, 0.6) * size
        t = rng.uniform(0, math.pi)
        pts = [
            (
                cx + rx * math.cos(a) * math.cos(t) - ry * math.sin(a) * math.sin(t),
                cy + rx * math.cos(a) * math.sin(t) + ry * math.sin(a) * math.cos(t),
            )
            for a in (2 * math.pi * i / 64 for i in range(64))
        ]
        draw.polygon(pts, fill=colour)
    elif kind == "band":  # a wavy band across the picture: dunes, hills, waves
        y0, amp = rng.uniform(0.2, 0.9) * size, rng.uniform(0.02, 0.25) * size
        freq, phase = rng.uniform(0.5, 3.0), rng.uniform(0, 2 * math.pi)
        tilt = rng.uniform(-0.5, 0.5) * size
        xs = [size * i / 32 for i in range(33)]
        top = [
            (x, y0 + tilt * x / size + amp * math.sin(freq * 2 * math.pi * x / size + phase))
            for x in xs
        ]
        draw.polygon([*top, (size, size), (0, size)], fill=colour)
    elif kind == "facets":  # low-poly: a triangle lattice, each facet a shade of one colour
        n = rng.randint(3, 9)
        step = size / n
        for i in range(n + 1):
            for j in range(n + 1):
                x, y = i * step, j * step
                for tri in (
                    [(x, y), (x + step, y), (x, y + step)],
                    [(x + step, y), (x + step, y + step), (x, y + step)],
                ):
                    if rng.random() < 0.6:
                        k = rng.uniform(0.8, 1.2)
                        draw.polygon(tri, fill=tuple(min(255, round(c * k)) for c in colour))
    else:  # stripes at an angle
        width, gap = rng.uniform(0.02, 0.12) * size, rng.uniform(0.03, 0.2) * size
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle), math.sin(angle)
        offset = -size
        while offset < 2 * size:
            px, py = offset * -dy + size / 2, offset * dx + size / 2
            a, b = (
                (px - 2 * size * dx, py - 2 * size * dy),
                (px + 2 * size * dx, py + 2 * size * dy),
            )
            draw.line([a, b], fill=colour, width=max(1, round(width)))
            offset += width + gap


def flat_art(seed: int, number: int, size: int = 224) -> Image.Image:
    """Picture ``number`` of the set drawn with ``seed``: a flat or gradient background and
    1-5 shapes in one palette; drawn again (same generator, next draw) while it is blank."""
    key = hashlib.sha256(f"flat-art/{seed}/{number}".encode()).digest()
    rng = random.Random(int.from_bytes(key[:8], "big"))
    big = size * SUPERSAMPLE
    while True:
        palette = _palette(rng)
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * math.pi)
            img = _gradient(big, rng.choice(palette), rng.choice(palette), angle)
        else:
            img = Image.new("RGB", (big, big), rng.choice(palette))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 5)):
            _shape(draw, rng, big, rng.choice(palette))
        img = img.resize((size, size), Image.Resampling.LANCZOS)
        if ImageStat.Stat(img.convert("L")).stddev[0] >= MIN_STD:
            return img


def write_flat_art(
    out: str | Path, n: int, seed: int = 0, size: int = 224, force: bool = False
) -> TileReport:
    """Writes ``out/NNNNN.png`` for numbers 0 to ``n`` - 1; built beside ``out`` and moved into
    place when complete (an existing ``out`` is replaced only with ``force``, and only if this
    module or :mod:`training.tiles` wrote it)."""
    if n < 1 or size < 8:
        raise DatasetError(f"--n must be >= 1 and --size >= 8 (got {n}, {size})")
    out = Path(out)

    def marker() -> str:
        return f"flat-art: n={n} seed={seed} size={size}\n"

    with building_folder(out, force, marker) as tmp:
        for i in range(n):
            flat_art(seed, i, size).save(tmp / f"{i:05d}.png")
    return TileReport(out, n, n, [])
