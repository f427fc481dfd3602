"""Result thumbnails for the page: stored in the index at indexing time
(`ImageIndex.thumbnail`), else decoded from the file, and only ever for files whose real path is
inside their root of the index (one of its roots: see `mocoretrieval.roots`)."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from mocoretrieval.data import load_image
from mocoretrieval.embed import DEFAULT_THUMBNAIL_SIZE
from mocoretrieval.errors import ImageError, MoCoRetrievalError
from mocoretrieval.roots import Roots
from mocoretrieval.video import is_video_name, load_keyframes

logger = logging.getLogger(__name__)

# Thumbnails, not originals, go to the browser: a 12 MP photo is ~5 MB, a 320 px JPEG ~20 kB,
# and a gallery cell (about 170 px wide) is smaller than that anyway. The index stores one per
# file, made at indexing time (DEFAULT_THUMBNAIL_SIZE, the side decoded ones get too); files
# without a usable one (an index built before them, a file edited since) are decoded here.
THUMB_THREADS = 4
THUMB_CACHE = 256  # thumbnails kept in memory: 256 x 320x240 RGB is about 60 MB at most


class PathOutsideRootError(MoCoRetrievalError):
    """A path resolves (through `..` or a symlink) to somewhere outside the indexed root."""


def resolve_in_root(root: str | Path | Roots, rel: str | Path) -> Path:
    """The real path of ``root / rel``, refusing anything that leaves the root.

    Both sides are resolved (symlinks followed, ``..`` removed) before the check, so neither
    ``../secret.jpg``, an absolute path, nor a symlink inside the root that points outside it
    gets through.

    Given the roots of a library (``index.roots``), ``rel`` is a key: its root is the one it
    names (``photos/a.jpg``), and the file must be inside that root. A key of no root (a removed
    or forged one) is refused like a path outside.

    Raises:
        PathOutsideRootError: the real path is not inside the real root.
        ImageError: the file does not exist (any more).
    """
    if isinstance(root, Roots):
        found = root.locate(os.fspath(rel))
        if found is None:
            raise PathOutsideRootError(f"refusing to serve {rel}: it is in no root of the index")
        root, rel = found[0].path, found[1]
    real_root = Path(root).resolve()
    candidate = real_root / rel
    try:
        real = candidate.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("file not found (moved or deleted since indexing?)", str(rel)) from None
    except (OSError, RuntimeError) as e:  # symlink loop, permission
        raise ImageError(f"cannot resolve path: {e}", str(rel)) from None
    if not real.is_relative_to(real_root):
        raise PathOutsideRootError(f"refusing to serve {rel}: it resolves outside {real_root}")
    if not real.is_file():
        raise ImageError("not a regular file", str(rel))
    return real


def thumbnail(path: str | Path, side: int = DEFAULT_THUMBNAIL_SIZE) -> Image.Image:
    """An RGB thumbnail fitting a ``side`` square, decoded as the indexer decodes images.

    Recent thumbnails are kept in memory (keyed by the file's real path, size and modification
    time, so an edited file is decoded again): clicking a result, changing k or coming back to
    an image shows mostly images already seen, and a large progressive JPEG takes 100-250 ms to
    decode even at reduced scale. The returned image is shared: do not modify it.

    Raises:
        ImageError: the file is missing, not an image, corrupt or a decompression bomb.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return _decode_thumbnail(real, side)  # raises the ImageError that says why
    return _cached_thumbnail(real, st.st_size, st.st_mtime_ns, side)


@functools.lru_cache(maxsize=THUMB_CACHE)
def _cached_thumbnail(real: str, size: int, mtime_ns: int, side: int) -> Image.Image:
    return _decode_thumbnail(real, side)


def _decode_thumbnail(path: str, side: int) -> Image.Image:
    if is_video_name(path):  # its first keyframe, as indexing stores it
        image = load_keyframes(path, min_side=side, max_frames=1)[0][0].image
        image.thumbnail((side, side))
        return image
    # Only the long side has to reach ``side``, so a JPEG can be decoded at the smallest DCT
    # scale that keeps it (1/8 for most photos): reading the header first is cheap.
    try:
        with Image.open(path) as header:
            w, h = header.size
    except Exception:  # noqa: BLE001 - load_image below says what is wrong with the file
        w = h = side
    image = load_image(path, min_side=max(1, math.ceil(side * min(w, h) / max(w, h, 1))))
    image.thumbnail((side, side))
    return image


def stored_thumbnail(index: Any, rel: str) -> Image.Image | None:
    """The thumbnail ``index`` stored for ``rel``, or None when it has no usable one (not
    stored, or the file was edited since): then the file is decoded instead."""
    if index is None:
        return None
    try:
        return index.thumbnail(rel)
    except MoCoRetrievalError as e:
        logger.debug("no stored thumbnail: %s", e)
    except Exception:  # a thumbnail is never worth failing a search for
        logger.exception("reading the stored thumbnail of %s failed; decoding the file", rel)
    return None


def clear_thumbnail_cache() -> None:
    """Forgets the thumbnails kept in memory (benchmarks time cold decoding with it)."""
    _cached_thumbnail.cache_clear()


def _resolved(root: str | Path | Roots, rel: str) -> Path | None:
    """:func:`resolve_in_root`, or None (logged) if the file is outside the root or unusable."""
    try:
        return resolve_in_root(root, rel)
    except PathOutsideRootError as e:
        logger.warning("%s", e)
    except ImageError as e:
        logger.info("not shown: %s", e)
    return None


def _decoded(real: Path) -> Image.Image | None:
    try:
        return thumbnail(real)
    except ImageError as e:
        logger.info("not shown: %s", e)
    return None


def safe_thumbnail(root: str | Path | Roots, rel: str, index: Any = None) -> Image.Image | None:
    """The thumbnail of ``root/rel``, or None (logged) if it is outside the root or unreadable.

    The thumbnail ``index`` stored is shown only after the file passed the same checks as a
    decoded one (inside the root, a regular file); the index gives it only while the file is
    unchanged since it was made.
    """
    return safe_thumbnails(root, [rel], index)[0]


def safe_thumbnails(
    root: str | Path | Roots, rels: Sequence[str], index: Any = None
) -> list[Image.Image | None]:
    """:func:`safe_thumbnail` of each of ``rels``: stored ones first, then the files without
    one decoded in parallel threads."""
    out: list[Image.Image | None] = [None] * len(rels)
    todo: list[tuple[int, Path]] = []
    for i, rel in enumerate(rels):
        real = _resolved(root, rel)
        if real is not None:
            out[i] = stored_thumbnail(index, rel)
            if out[i] is None:
                todo.append((i, real))
    if len(todo) <= 1:  # no decoding to share: threads cost more
        decoded = [_decoded(real) for _, real in todo]
    else:  # Pillow releases the GIL while decoding: the thumbnails are made in parallel
        with ThreadPoolExecutor(max_workers=THUMB_THREADS) as pool:
            decoded = list(pool.map(_decoded, (real for _, real in todo)))
    for (i, _), image in zip(todo, decoded):
        out[i] = image
    return out
