"""Training instances cut from a few large photographs: seeded square tiles at many scales.

Instance discrimination needs many instances, and the photo corpus has a few dozen pictures.
Each picture of a folder becomes ``per_picture`` square tiles, their sides drawn log-uniformly
between ``min_scale`` and 1 of the picture's short side, at random positions, resized to
``size`` pixels. A tile is a function of (seed, the picture's relative path, its number), so
the same folder and arguments give the same tiles, and adding a picture moves no other tile.

The tiles of one picture overlap, so some of them are near neighbours of one another in the
negatives of the contrastive loss; with the 60-90% crops of copy detection in mind, tiles that
differ by position and scale are different enough to be told apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mocoretrieval.data import load_image
from mocoretrieval.errors import DatasetError, ImageError
from mocoretrieval.walk import walk_images

TILE_QUALITY = 95
MARKER = "tiles.txt"  # written last: a folder without it is not (or not yet) a tile folder


@dataclass(frozen=True)
class TileReport:
    out: Path
    pictures: int
    tiles: int
    skipped: list[str]


@contextlib.contextmanager
def building_folder(out: Path, force: bool, marker: Callable[[], str]) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it once the block completes (with
    ``marker()`` written last); an interrupted build leaves nothing. An existing ``out`` is
    replaced only with ``force``, and only if this module wrote it (it has :data:`MARKER`)."""
    if out.exists() and not force:
        raise DatasetError(f"{out} exists; pass --force to rebuild it, or choose another folder")
    if out.exists() and not (out / MARKER).is_file():
        raise DatasetError(
            f"{out} exists and is not a tile folder or distractor folder (no {MARKER}); "
            "choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(marker())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def tile_boxes(
    width: int, height: int, n: int, min_scale: float, rng: random.Random
) -> list[tuple[int, int, int, int]]:
    """``n`` square boxes inside a ``width`` x ``height`` picture (the first one the largest
    centred square), sides log-uniform in [min_scale, 1] of the short side."""
    if not 0 < min_scale <= 1:
        raise DatasetError(f"min_scale must be in (0, 1], got {min_scale}")
    short = min(width, height)
    boxes = [((width - short) // 2, (height - short) // 2, short)]
    lo = math.log(min_scale)
    while len(boxes) < n:
        side = max(1, round(short * math.exp(rng.uniform(lo, 0.0))))
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        boxes.append((x, y, side))
    return [(x, y, x + s, y + s) for x, y, s in boxes[:n]]


def cut_tiles(
    src: str | Path,
    out: str | Path,
    per_picture: int = 150,
    size: int = 224,
    min_scale: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> TileReport:
    """Writes ``out/PICTURE/NNNN.jpg`` for every picture under ``src``; see the module doc.

    The folder is built beside ``out`` and moved into place when complete, so an interrupted
    run leaves no half-made tile folder. An existing ``out`` is replaced only with ``force``
    and only if it is a tile folder (it has ``tiles.txt``).
    """
    src, out = Path(src), Path(out)
    if per_picture < 1 or size < 8:
        raise DatasetError(f"per_picture must be >= 1 and size >= 8 (got {per_picture}, {size})")
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder; pass the corpus's train/ folder")
    files = walk_images(src)
    if not files:
        raise DatasetError(f"no images under {src}")
    skipped: list[str] = []
    tiles = 0

    def marker() -> str:
        return (
            f"tiles of {src}: per_picture={per_picture} size={size} min_scale={min_scale} "
            f"seed={seed}; {len(files) - len(skipped)} pictures, {tiles} tiles\n"
        )

    with building_folder(out, force, marker) as tmp:
        for rel in files:
            try:
                img = load_image(src / rel)
            except ImageError as e:
                skipped.append(str(e))
                continue
            key = hashlib.sha256(f"{seed}/{rel}".encode()).digest()
            rng = random.Random(int.from_bytes(key[:8], "big"))
            folder = tmp / Path(rel).with_suffix("")
            folder.mkdir(parents=True)
            for i, box in enumerate(tile_boxes(*img.size, per_picture, min_scale, rng)):
                tile = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
                tile.save(folder / f"{i:04d}.jpg", "JPEG", quality=TILE_QUALITY)
                tiles += 1
    return TileReport(out, len(files) - len(skipped), tiles, skipped)


# --- distractors for copy detection ---------------------------------------------------------

# Folders of desktop artwork: what is not one of the corpus's photographs is a distractor.
ARTWORK_ROOTS = ("/usr/share/wallpapers", "/usr/share/backgrounds")
# Grey-level standard deviation below which a picture is blank: MATE's transparent PNGs
# decode to plain white, and blank pictures are one another's exact duplicates.
BLANK_STD = 2.0
# A size, orientation or light/dark suffix: NAME_3840x2160, NAME_768x1024_Portrait, NAME-d.
_VARIANT = re.compile(r"(_\d+x\d+)?(_Portrait)?(-[ld])?$")
# Colour versions of one design, named apart (MATE's Ubuntu-Mate-{Cold,Dark,Warm,...}-no-logo):
# a copy-detection encoder, trained to ignore colour, rightly calls them near-duplicates.
_FAMILIES = ((re.compile(r"Ubuntu-Mate-[A-Za-z]+-no-logo$"), "Ubuntu-Mate-no-logo"),)


def variant_of(rel: str) -> str:
    """The picture a file is a variant of: its path without a size/orientation/light-dark
    suffix (``mate/abstract/Elephants_3840x2160.jpg`` -> ``mate/abstract/Elephants``)."""
    name = _VARIANT.sub("", str(Path(rel).with_suffix("")), count=1)
    for family, base in _FAMILIES:
        name = family.sub(base, name)
    return name


def write_distractors(
    out: str | Path,
    photo_files: set[str],
    roots: tuple[str, ...] = ARTWORK_ROOTS,
    max_side: int = 1024,
    force: bool = False,
) -> TileReport:
    """Copies every raster image under ``roots`` that is not one of ``photo_files`` (resolved
    paths of the corpus's photographs, trained on or held out) into ``out``, long side at most
    ``max_side``: renders, patterns and illustrations no encoder here trains on, to search
    copies of held-out photos among. Byte-identical files and the variants of one picture
    (plasma's sizes and dark versions; ``_WxH``, ``_Portrait`` and ``-l``/``-d`` suffixes;
    colour versions named apart, :data:`_FAMILIES`) are written once, the
    largest; blank pictures are left out. No two distractors are then near-duplicates, which
    the duplicates evaluation relies on."""
    out = Path(out)
    if out.exists() and not force:  # before reading any picture; building_folder checks it again
        raise DatasetError(f"{out} exists; pass --force to rebuild it, or choose another folder")
    best: dict[str, tuple[int, Path]] = {}  # group -> (pixels, file)
    seen: set[str] = set()
    # a plasma wallpaper folder holding a photograph is the photograph's (its screenshot too)
    photo_dirs = {
        str(Path(*p.parts[: p.parts.index("contents")]))
        for p in map(Path, photo_files)
        if "contents" in p.parts
    }
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for rel in walk_images(root):
            path = (root / rel).resolve()
            parts = Path(rel).parts
            if str(path) in photo_files or path.suffix.lower() == ".svg":
                continue
            if "contents" in parts and (
                path.stem == "screenshot" or str(root / parts[0]) in photo_dirs
            ):
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            # plasma: NAME/contents/images[_dark]/WxH.ext are one picture per images folder
            group = (
                f"{root.name}/{parts[0]}"  # its sizes, and images_dark/ (a dark variant)
                if "contents" in parts
                else f"{root}/{variant_of(rel)}"
            )
            try:
                with Image.open(path) as img:
                    pixels = img.size[0] * img.size[1]
            except (OSError, Image.DecompressionBombError):
                continue
            if group not in best or pixels > best[group][0]:
                best[group] = (pixels, path)
    skipped: list[str] = []

    def marker() -> str:
        return f"distractors: {len(best) - len(skipped)} images of {roots}\n"

    with building_folder(out, force, marker) as tmp:
        for group in sorted(best):
            path = best[group][1]
            try:
                img = load_image(path)
            except ImageError as e:
                skipped.append(str(e))
                continue
            if np.asarray(img.convert("L")).std() < BLANK_STD:
                skipped.append(f"{path}: blank (a transparent picture shows nothing)")
                continue
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            name = group.strip("/").replace("/", "_")
            img.save(tmp / f"{name}.jpg", "JPEG", quality=TILE_QUALITY)
    return TileReport(out, len(best) - len(skipped), len(best) - len(skipped), skipped)
