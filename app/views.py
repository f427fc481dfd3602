"""What the page shows: library calls turned into gallery items and messages, never tracebacks.

Every function here is plain Python over an `ImageIndex` (no Gradio), so the UI in `app.ui` is
wiring only and this module is unit-tested on its own. User errors (a bad upload, an empty index,
a vanished file) become a message for the page; an unexpected error is logged with its traceback
on the server and shown as one line. Thumbnails, and the check that keeps the page inside the
indexed root, are in `app.thumbnails` (re-exported here).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from mocoretrieval import dedupe
from mocoretrieval.data import load_image
from mocoretrieval.errors import ImageError, MoCoRetrievalError

from .thumbnails import (
    PathOutsideRootError,
    clear_thumbnail_cache,
    resolve_in_root,
    safe_thumbnail,
    safe_thumbnails,
    thumbnail,
)

__all__ = [  # the thumbnail API, re-exported: callers and tests use it through `views`
    "PathOutsideRootError",
    "clear_thumbnail_cache",
    "resolve_in_root",
    "thumbnail",
]

logger = logging.getLogger(__name__)

MAX_K = 100
# The lowest similarity the page groups near-duplicates at: below it most of a collection
# links up into one group, which only costs the server time to compute and the user to read.
MIN_DUPLICATE_THRESHOLD = 0.8
# Phone photos are 3-15 MB; 50 MB leaves room for panoramas and still bounds what one request
# can make the server store and decode. Pixels are bounded separately, by `load_image`'s
# decompression-bomb check.
MAX_UPLOAD_MB = 50

GalleryItem = tuple[Image.Image, str]


@dataclass
class SearchOutcome:
    """What one search puts on the page.

    Attributes:
        items: the gallery, best first: (thumbnail, caption "score · path").
        paths: the relative path of each gallery item, in the same order (for click-to-search).
        message: markdown shown above the gallery; empty when all went well.
    """

    items: list[GalleryItem] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    message: str = ""


def check_upload(
    path: str | Path | None, max_mb: float = MAX_UPLOAD_MB, upload_dir: str | Path | None = None
) -> Path:
    """Checks an uploaded file before decoding it: an upload, a regular file, non-empty, not
    over the size limit.

    Gradio already refuses larger uploads (``max_file_size``); this repeats the bound so the
    search functions are safe on their own. The search handler receives the request's payload
    unprocessed, so an API call can name any path: with ``upload_dir``, only a file whose real
    path is inside it (where Gradio stores what it received) is accepted.

    Raises:
        ImageError: no file, not an upload, not a regular file, an empty file, or one over
            ``max_mb`` megabytes.
    """
    if path is None:
        raise ImageError("no image given: upload or paste one")
    p = Path(path)
    if upload_dir is not None:
        real, uploads = Path(os.path.realpath(p)), Path(os.path.realpath(upload_dir))
        if not real.is_relative_to(uploads):
            raise ImageError("not an uploaded file: upload the image instead", p.name)
    try:
        st = p.stat()
    except OSError:
        raise ImageError("the upload did not arrive; try again", p.name) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file", p.name)
    size = st.st_size
    if size == 0:
        raise ImageError("empty file", p.name)
    if size > max_mb * 1e6:
        raise ImageError(f"file too large ({size / 1e6:.1f} MB); at most {max_mb:g} MB", p.name)
    return p


def _root(index: Any) -> Any:
    """What `resolve_in_root` checks a path against: the index's roots (a key names its root),
    or the folder of a stand-in index that has no ``roots``."""
    roots = getattr(index, "roots", None)
    return roots if roots is not None else Path(index.root)


def _roots_of(index: Any) -> list[Any]:
    """The folders of the index, for messages."""
    return [r.path for r in getattr(index, "roots", [])] or [Path(index.root)]


def _absolute(index: Any, rel: str) -> Path:
    """Where the file of a key is now (unresolved: a symlink is itself, not its target)."""
    absolute = getattr(index, "absolute", None)
    return Path(absolute(rel)) if absolute is not None else Path(index.root) / rel


def _count(index: Any) -> int:
    return len(index)


def _caption(path: str, score: float) -> str:
    # Score first: a narrow gallery cell truncates the end of its caption.
    return f"{score:.3f} · {path}"


def parse_caption(caption: str) -> tuple[str, float]:
    """Inverse of the gallery caption: ``"0.912 · a/b.jpg"`` -> ``("a/b.jpg", 0.912)``."""
    score, _, path = caption.partition(" · ")
    return path, float(score)


def gallery_items(
    root: str | Path, results: Sequence[Any], index: Any = None
) -> tuple[list[GalleryItem], list[str], int]:
    """Thumbnails and captions for search results, skipping what cannot be shown safely.

    Args:
        root: the indexed root.
        results: the index's `SearchResult`s (``.relpath`` and ``.score`` are used).
        index: the index whose stored thumbnails to show; None decodes every file.

    Returns:
        (items, their relative paths, how many results were left out).
    """
    rels = [r.relpath for r in results]
    thumbs = safe_thumbnails(root, rels, index)
    items, paths = [], []
    for rel, r, thumb in zip(rels, results, thumbs):
        if thumb is not None:
            items.append((thumb, _caption(rel, r.score)))
            paths.append(rel)
    return items, paths, len(rels) - len(items)


def clamp_k(k: Any, default: int = 10) -> int:
    """``k`` as an int in [1, MAX_K]; junk becomes ``default``."""
    try:
        return max(1, min(MAX_K, int(k)))
    except (TypeError, ValueError):
        return default


def _search(index: Any, query: Any, k: Any) -> SearchOutcome:
    if _count(index) == 0:
        return SearchOutcome(
            message="**The index is empty.** Add images to the folder and run "
            f"`mocoretrieval index {' '.join(str(r) for r in _roots_of(index))}`, then search "
            "again."
        )
    results = index.search(query, k=clamp_k(k))
    items, paths, left_out = gallery_items(_root(index), results, index)
    if not items:
        msg = "**No results.**"
        if left_out:
            msg += f" {left_out} match(es) could not be shown (moved, deleted or unreadable)."
        return SearchOutcome(message=msg)
    msg = (
        f"{left_out} result(s) could not be shown (moved, deleted or unreadable)."
        if left_out
        else ""
    )
    return SearchOutcome(items, paths, msg)


def _guarded(fn, *args: Any) -> SearchOutcome:
    """Runs a search; user errors and unexpected ones become a one-line message."""
    try:
        return fn(*args)
    except MoCoRetrievalError as e:
        return SearchOutcome(message=f"**Cannot search:** {e}")
    except Exception:  # the page must never show a traceback; the server log keeps it
        logger.exception("search failed")
        return SearchOutcome(message="**Search failed unexpectedly**; the server log has details.")


def search_upload(
    index: Any,
    upload: str | Path | None,
    k: Any,
    max_mb: float = MAX_UPLOAD_MB,
    upload_dir: str | Path | None = None,
) -> SearchOutcome:
    """Searches with an uploaded or pasted image file (inside ``upload_dir``, when given)."""

    def run() -> SearchOutcome:
        # Decoded here, as the indexer decodes files, so a bad upload gets its own reason.
        min_side = getattr(getattr(index, "encoder", None), "resize_size", None)
        try:
            image = load_image(check_upload(upload, max_mb, upload_dir), min_side=min_side)
        except ImageError as e:  # name the user's file, not the server's copy of it
            raise ImageError(e.reason, Path(upload).name if upload else None) from e
        return _search(index, image, k)

    return _guarded(run)


def search_indexed(index: Any, rel: str, k: Any) -> SearchOutcome:
    """Searches with an image of the indexed folder (a clicked result or example)."""
    return _guarded(lambda: _search(index, resolve_in_root(_root(index), rel), k))


def query_thumbnail(index: Any, rel: str) -> Image.Image | None:
    """A thumbnail of an indexed image to show as the query, or None if it cannot be shown."""
    return safe_thumbnail(_root(index), rel, index)


# --- index summary, near-duplicates, examples ----------------------------------------------


def _when(value: Any) -> str:
    """A timestamp (epoch seconds or ISO 8601 text) as local ``YYYY-MM-DD HH:MM``."""
    if value is None or value == "":
        return "never"
    try:
        if isinstance(value, (int, float)):
            moment = datetime.fromtimestamp(value)
        else:
            moment = datetime.fromisoformat(str(value)).astimezone()
    except (ValueError, OverflowError, OSError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M")


def summary_markdown(info: dict[str, Any], max_skipped: int = 20) -> str:
    """The index summary shown on the page: model, images, dimension, index type, last update,
    and the skipped files with their reasons (the first ``max_skipped``)."""
    skipped = info.get("skipped") or {}
    n_skipped = skipped if isinstance(skipped, int) else len(skipped)
    lines = [
        f"- **Model:** `{info.get('model') or 'not recorded (an in-memory encoder)'}`",
        f"- **Images:** {info.get('count', 0)}",
        f"- **Dimension:** {info.get('dim', '?')}",
        f"- **Index type:** `{info.get('index_type', '?')}`",
        f"- **Last update:** {_when(info.get('last_update'))}",
        f"- **Skipped files:** {n_skipped}",
    ]
    if isinstance(skipped, dict):
        for path, reason in list(skipped.items())[:max_skipped]:
            lines.append(f"    - `{path}`: {reason}")
        if n_skipped > max_skipped:
            lines.append(f"    - ... and {n_skipped - max_skipped} more (`mocoretrieval info`)")
    return "\n".join(lines)


def index_summary(index: Any) -> str:
    """`summary_markdown` of a live index, or why it cannot be shown."""
    try:
        return summary_markdown(index.info())
    except MoCoRetrievalError as e:
        return f"**Cannot read the index:** {e}"


@dataclass
class DuplicateView:
    """Duplicate groups as the page lists them.

    Attributes:
        groups: relative paths of each group, largest group first.
        labels: one dropdown label per group (with its tier).
        keepers: the copy suggested to keep in each group (relative path).
        message: markdown above the list.
    """

    groups: list[list[str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    message: str = ""
    keepers: list[str] = field(default_factory=list)


def find_duplicates(index: Any, threshold: float, keep: str = "largest") -> DuplicateView:
    """Groups of duplicate images whose similarity is at least ``threshold``, each with its
    tier and the copy ``keep`` suggests keeping (see :func:`mocoretrieval.dedupe.suggest`)."""
    try:
        if _count(index) == 0:
            return DuplicateView(message="**The index is empty.**")
        threshold = max(float(threshold), MIN_DUPLICATE_THRESHOLD)
        found = sorted(index.duplicates(threshold), key=len, reverse=True)
        proposals = dedupe.suggest(found, keep, root=getattr(index, "relative", index.root))
    except MoCoRetrievalError as e:
        return DuplicateView(message=f"**Cannot look for duplicates:** {e}")
    except Exception:  # the page must never show a traceback; the server log keeps it
        logger.exception("duplicates failed")
        return DuplicateView(message="**Duplicate search failed unexpectedly**; see the log.")
    groups = [[r.relpath for r in g] for g in found]
    if not groups:
        return DuplicateView(message=f"No near-duplicates at similarity ≥ {threshold:.2f}.")
    keepers = [
        next((r.relpath for r in g if r.path == p.keeper), g[0].relpath)
        for g, p in zip(found, proposals)
    ]
    labels = [
        f"{i + 1}. [{getattr(g, 'tier', 'near')}] {k} (+{len(g) - 1})"
        for i, (g, k) in enumerate(zip(found, keepers))
    ]
    n_images = sum(len(g) for g in groups)
    message = f"{len(groups)} group(s), {n_images} images, at similarity ≥ {threshold:.2f}."
    return DuplicateView(groups, labels, message, keepers)


def picked_group(
    view_groups: Sequence[Sequence[str]], labels: Sequence[str], label: str | None
) -> list[str]:
    """The relative paths of the group picked by its dropdown ``label`` (empty if none)."""
    return list(view_groups[list(labels).index(label)]) if label in labels else []


def trash_others(index: Any, group: Sequence[str], keep: str | None) -> str:
    """Sends every file of ``group`` but ``keep`` to the trash, through the journaled
    :func:`mocoretrieval.dedupe.apply` (``mocoretrieval undo`` restores them). Returns the
    message for the page."""
    if not group or keep not in group:
        return "**Pick a group and the copy to keep first.**"
    try:
        root = _root(index)
        for rel in group:  # the check only: a symlink is trashed itself, not its target
            resolve_in_root(root, rel)
        kept = str(_absolute(index, keep))
        others = [str(_absolute(index, rel)) for rel in group if rel != keep]
        proposal = dedupe.Proposal("", "", [kept], others)
        report = dedupe.apply(index, [proposal], trash=True)
    except (MoCoRetrievalError, PathOutsideRootError) as e:
        return f"**Nothing trashed:** {e}"
    except Exception:
        logger.exception("trash failed")
        return "**Trashing failed unexpectedly**; see the log. `mocoretrieval undo` restores."
    lines = [f"Trashed {len(report.moved)} file(s); kept `{keep}`. `mocoretrieval undo` restores."]
    lines += [f"- left `{Path(p).name}`: {why}" for p, why in report.failed.items()]
    return "\n".join(lines)


def mark_not_duplicates(index: Any, group: Sequence[str]) -> str:
    """Records the files of ``group`` as not duplicates of each other; the message."""
    try:
        pairs = index.mark_not_duplicates(list(group))
    except MoCoRetrievalError as e:
        return f"**Not recorded:** {e}"
    return f"Recorded {len(pairs)} pair(s) as not duplicates: they will not be grouped again."


def group_items(
    index: Any, view_groups: Sequence[Sequence[str]], label: str | None, labels: Sequence[str]
) -> list[GalleryItem]:
    """Thumbnails of the group picked by its dropdown ``label`` (empty if none is picked)."""
    group = picked_group(view_groups, labels, label)
    thumbs = safe_thumbnails(_root(index), group, index)
    return [(thumb, rel) for thumb, rel in zip(thumbs, group) if thumb is not None]


def example_items(index: Any, n: int) -> list[GalleryItem]:
    """Thumbnails of ``n`` images spread evenly over the index, captioned with their paths."""
    try:
        paths = index.paths()
    except MoCoRetrievalError as e:
        logger.warning("no examples: %s", e)
        return []
    step = max(1, len(paths) // max(1, n))
    spread = paths[::step] + [p for i, p in enumerate(paths) if i % step]  # then fill the gaps
    items: list[GalleryItem] = []
    for rel in spread:
        if len(items) == n:
            break
        thumb = safe_thumbnail(_root(index), rel, index)
        if thumb is not None:
            items.append((thumb, rel))
    return items
