"""Paths read from the index database or the disk, made safe to use and to print.

The database is not trusted: a stored path is used only once it is proven to stay inside the
indexed root, and printed only with its control characters escaped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def under(path: str, folders: Iterable[str]) -> bool:
    """Whether ``path`` is inside one of ``folders`` (POSIX, relative; ``"."`` is the root)."""
    return any(f == "." or path.startswith(f.rstrip("/") + "/") for f in folders)


def inside_root(rel: str) -> str | None:
    """A stored relative path, normalised; None for one that is absolute or leaves the root
    (``../../etc/passwd``): the database is not trusted."""
    norm = os.path.normpath(rel) if rel and "\x00" not in rel else ""
    if not norm or norm in (".", "..") or os.path.isabs(norm) or norm.startswith("../"):
        log.warning("ignoring stored path %s: it is not inside the root", display(rel))
        return None
    return norm


def display(text: str) -> str:
    """Text from the database as safe to print: control characters escaped (a crafted name
    must not drive the terminal)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def file_key(path: Path) -> tuple[int, int, int] | None:
    """Identifies one version of a file replaced by rename: (inode, mtime, size)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
