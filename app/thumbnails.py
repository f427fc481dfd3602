"""Result thumbnails for the page: stored in the index at indexing time, else decoded from the
file, and only ever for files whose real path is inside the indexed root."""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from mocoretrieval.data import load_image
from mocoretrieval.errors import ImageError, MoCoRetrievalError
from mocoretrieval.store import StoredThumbnail

logger = logging.getLogger(__name__)

# Thumbnails, not originals, go to the browser: a 12 MP photo is ~5 MB, a 320 px JPEG ~20 kB,
# and a gallery cell (about 170 px wide) is smaller than that anyway. The index stores one per
# file, made at indexing time (mocoretrieval.embed.DEFAULT_THUMBNAIL_SIZE, the same side); files
# without one (an index built before them) are decoded here.
THUMB_SIDE = 320
THUMB_THREADS = 4
THUMB_CACHE = 256  # thumbnails kept in memory: 256 x 320x240 RGB is about 60 MB at most


class PathOutsideRootError(MoCoRetrievalError):
    """A path resolves (through `..` or a symlink) to somewhere outside the indexed root."""


def resolve_in_root(root: str | Path, rel: str | Path) -> Path:
    """The real path of ``root / rel``, refusing anything that leaves the root.

    Both sides are resolved (symlinks followed, ``..`` removed) before the check, so neither
    ``../secret.jpg``, an absolute path, nor a symlink inside the root that points outside it
    gets through.

    Raises:
        PathOutsideRootError: the real path is not inside the real root.
        ImageError: the file does not exist (any more).
    """
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


def thumbnail(path: str | Path, side: int = THUMB_SIDE) -> Image.Image:
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


def stored_thumbnails(index: Any, rels: Sequence[str]) -> dict[str, StoredThumbnail]:
    """The thumbnails the index stored for ``rels`` (relative paths); {} when it has none."""
    lookup = getattr(getattr(index, "store", None), "thumbnails", None)
    if lookup is None or not rels:
        return {}
    try:
        return lookup(rels)
    except Exception:  # a thumbnail is never worth failing a search for
        logger.exception("reading stored thumbnails failed; decoding the files instead")
        return {}


def _open_stored(real: Path, stored: StoredThumbnail | None) -> Image.Image | None:
    """The stored thumbnail as an image, if it was made from the file as it is now."""
    if stored is None:
        return None
    try:
        st = real.stat()
        if (st.st_size, st.st_mtime_ns) != tuple(stored.stat):
            return None  # edited since indexing: the stored one shows the old content
        image = Image.open(io.BytesIO(stored.jpeg))
        image.load()
        return image
    except Exception as e:  # noqa: BLE001 - decode the file instead
        logger.debug("%s: stored thumbnail unusable: %s", real, e)
        return None


def clear_thumbnail_cache() -> None:
    """Forgets the thumbnails kept in memory (benchmarks time cold decoding with it)."""
    _cached_thumbnail.cache_clear()


def safe_thumbnail(
    root: str | Path, rel: str, stored: StoredThumbnail | None = None
) -> Image.Image | None:
    """The thumbnail of ``root/rel``, or None (logged) if it is outside the root or unreadable.

    The stored thumbnail is shown only after the file passed the same checks as a decoded one
    (inside the root, a regular file) and only if the file is unchanged since it was made.
    """
    try:
        real = resolve_in_root(root, rel)
        return _open_stored(real, stored) or thumbnail(real)
    except PathOutsideRootError as e:
        logger.warning("%s", e)
    except ImageError as e:
        logger.info("not shown: %s", e)
    return None


def safe_thumbnails(
    root: str | Path, rels: Sequence[str], stored: Mapping[str, StoredThumbnail]
) -> list[Image.Image | None]:
    """:func:`safe_thumbnail` of each of ``rels``, files to decode in parallel threads."""
    if len(rels) <= 1 or all(rel in stored for rel in rels):  # no decoding: threads cost more
        return [safe_thumbnail(root, rel, stored.get(rel)) for rel in rels]
    # Pillow releases the GIL while decoding, so the thumbnails are made in parallel threads.
    with ThreadPoolExecutor(max_workers=THUMB_THREADS) as pool:
        return list(pool.map(lambda rel: safe_thumbnail(root, rel, stored.get(rel)), rels))
