"""Finding the image files under a folder: what can be read, what cannot and why, what the
ignore rules leave out. Decoding them is :mod:`.data`'s part."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from . import formats
from .errors import ImageError
from .ignore import IGNORE_FILE, IgnoreRules, Rule

logger = logging.getLogger(__name__)

# What is read, and by which decoder, is :mod:`.formats`' table (HEIF, AVIF, camera RAW too).
IMAGE_EXTENSIONS: frozenset[str] = formats.EXTENSIONS


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS`, in any case."""
    return os.path.splitext(name)[1][1:].lower() in IMAGE_EXTENSIONS


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Scan(NamedTuple):
    """What :func:`scan_images` found under a root; every path is POSIX, relative to it.

    Attributes:
        files: the image files (or links to them) that can be read, with their ``os.stat``.
        problems: image-named entries that cannot be indexed, and why (a broken link, a symlink
            loop, a FIFO or other non-regular file, a name that is not UTF-8, shown with its
            undecodable bytes escaped).
        unreadable: folders that could not be listed, and why: what they held is unknown, not
            deleted (``"."`` when the root itself could not be listed).
        paired: RAW files left out of ``files`` because a JPEG or HEIF of the same name beside
            them stands for the same photo -> that file (see
            :func:`.formats.collapse_raw_pairs`).
        excluded: what the ignore rules left out -> the rule that did: image files by path,
            folders (not entered) by path and a trailing ``/`` (see :mod:`.ignore`).
    """

    files: dict[str, os.stat_result]
    problems: dict[str, str]
    unreadable: dict[str, str]
    paired: dict[str, str]
    excluded: dict[str, Rule]


def _problem(full: str) -> tuple[os.stat_result | None, str | None]:
    """``(stat, None)`` of a readable regular file, else ``(None, reason)``."""
    try:
        st = os.stat(full)
    except FileNotFoundError:
        return None, "broken link" if os.path.islink(full) else "vanished"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symlink loop"
        return None, f"unreadable: {(e.strerror or str(e)).lower()}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (a FIFO)" if stat.S_ISFIFO(st.st_mode) else (
            "not a regular file"
        )
    return st, None


def scan_images(
    root: str | Path,
    exclude: Sequence[str | Path] = (),
    *,
    follow_symlinks: bool = False,
    patterns: Sequence[str] = (),
) -> Scan:
    """Finds the image files under ``root``, and says what it could not use and why.

    The ignore rules of :mod:`.ignore` apply: the defaults (hidden names, NAS and OS clutter),
    ``patterns`` (gitignore patterns relative to ``root``, as ``--exclude`` gives them) and the
    ``.mocoretrievalignore`` files of the tree. An excluded folder is never listed, nor is any
    folder in ``exclude`` (e.g. the index's own folder, whatever the rules say). Symlinked files
    are listed; symlinked folders are only entered with ``follow_symlinks``, and then never
    twice (no loops, no duplicates). Only regular files are listed: a FIFO named ``x.jpg``
    would block whoever opens it. A RAW file with a JPEG or HEIF of the same name beside it is
    one photo: only the latter is listed.

    Raises:
        ImageError: ``root`` is not a folder.
        IgnoreRuleError: a pattern is malformed, or an ignore file cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageError("not a folder; pass the folder that holds your images", str(root))
    excluded = {os.path.realpath(p) for p in exclude}
    seen: set[tuple[int, int]] = set()
    files: dict[str, os.stat_result] = {}
    problems: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    ignored: dict[str, Rule] = {}
    # The rules in force in each folder still to be walked: its parent's, until its own
    # ignore file (if any) is read on entering it.
    rules_of: dict[str, IgnoreRules] = {".": IgnoreRules.for_root(patterns)}

    def on_error(err: OSError) -> None:  # an unreadable sub-folder is reported, not fatal
        where = os.path.relpath(err.filename or root, root)
        folder = _display(Path(where).as_posix())
        unreadable[folder] = f"cannot list it: {(err.strerror or str(err)).lower()}"
        logger.warning("cannot list folder %s: %s", folder, err.strerror or err)

    for dirpath, dirnames, filenames in os.walk(
        root, onerror=on_error, followlinks=follow_symlinks
    ):
        rel = Path(dirpath).relative_to(root)
        folder = rel.as_posix()
        rules = rules_of.pop(folder)
        if follow_symlinks:
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
        if IGNORE_FILE in filenames:
            rules = rules.with_file(root, "" if folder == "." else folder)
        kept = []
        for d in sorted(dirnames):
            path = (rel / d).as_posix()
            if os.path.realpath(os.path.join(dirpath, d)) in excluded:
                continue
            rule = rules.match(path, is_dir=True)
            if rule is not None:  # pruned: an @eaDir tree is never listed
                ignored[path + "/"] = rule
                continue
            kept.append(d)
            rules_of[path] = rules
        dirnames[:] = kept
        for name in filenames:
            if not is_image_name(name):
                continue
            path = (rel / name).as_posix()
            rule = rules.match(path, is_dir=False)
            if rule is not None:
                ignored[path] = rule
                continue
            if not _is_utf8(path):
                # Python holds the undecodable bytes as surrogates, which no index, JSON or
                # SQLite text can store: the file is listed by its escaped name instead.
                logger.warning(
                    "skipping %r: its name is not valid UTF-8; rename it to index it", path
                )
                problems[_display(path)] = "name is not valid UTF-8: rename it to index it"
                continue
            st, reason = _problem(os.path.join(dirpath, name))
            if reason is not None:
                problems[path] = reason
            else:
                files[path] = st
    kept_files, paired = formats.collapse_raw_pairs(sorted(files))
    return Scan(
        {p: files[p] for p in kept_files},
        dict(sorted(problems.items())),
        unreadable,
        paired,
        {_display(p): rule for p, rule in sorted(ignored.items())},
    )


def empty_folders(
    root: str | Path, gone: Sequence[str], exclude: Sequence[str | Path] = ()
) -> dict[str, list[str]]:
    """The paths of ``gone`` (relative to ``root``, no longer found there) whose deepest folder
    that still exists lists no entries at all (``exclude`` aside), grouped by that folder.

    An unmounted drive looks like that: its mount point is an empty folder, and the photos that
    were under it are not deleted, only out of reach. A path whose deepest existing folder lists
    something was deleted, and is left out (``"."`` stands for ``root`` itself).
    """
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    found: dict[str, str | None] = {}  # folder -> the empty folder it is or lies in, or None

    def lists_nothing(folder: Path) -> bool:
        try:
            with os.scandir(folder) as entries:
                return all(os.path.realpath(e.path) in excluded for e in entries)
        except OSError:  # listed by the walk a moment ago: a race, not an unmounted drive
            return False

    def empty_of(folder: str) -> str | None:
        if folder not in found:
            if (root / folder).is_dir():
                found[folder] = folder if lists_nothing(root / folder) else None
            else:  # deleted with its folder, or out of reach with a folder above it
                found[folder] = None if folder == "." else empty_of(os.path.dirname(folder) or ".")
        return found[folder]

    out: dict[str, list[str]] = {}
    for path in gone:
        folder = empty_of(os.path.dirname(path) or ".")
        if folder is not None:
            out.setdefault(folder, []).append(path)
    return out


def _display(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not are escaped as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def walk_images(
    root: str | Path,
    exclude: Sequence[str | Path] = (),
    *,
    follow_symlinks: bool = False,
    patterns: Sequence[str] = (),
) -> list[str]:
    """The readable image files under ``root``, as sorted POSIX paths relative to it.

    See :func:`scan_images`, which also says what was left out and why (files that are not
    regular, broken links, names that are not UTF-8, folders that cannot be listed, what the
    ignore rules excluded).

    Raises:
        ImageError: ``root`` is not a folder.
        IgnoreRuleError: a pattern is malformed, or an ignore file cannot be read.
    """
    scan = scan_images(root, exclude, follow_symlinks=follow_symlinks, patterns=patterns)
    return list(scan.files)
