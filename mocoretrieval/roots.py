"""The roots of a library: the folders one index covers, and how a file's key names its root.

Each file is stored under a *key*: its POSIX path relative to its root, prefixed with the
root's name (``photos/2020/a.jpg``), as if the library were one folder holding each root as a
sub-folder. A library of one root made by ``index ROOT`` (every index made before several
roots existed) keys its files without the prefix (``2020/a.jpg``): its root is *bare*. Adding
a second root gives the bare one its name, prefixing its keys once (no file is re-embedded).

Keys never hold a root's location, so moving a root (:meth:`ImageIndex.move_root`) rewrites
one row, and moving the index folder changes nothing (a root that holds the index is stored
relative to it, the others absolute).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import MoCoRetrievalError

_NAME_BAD = re.compile(r"[\x00-\x1f/\\]")


class RootError(MoCoRetrievalError):
    """A root that cannot be added, found, moved or removed; the message says why."""


@dataclass(frozen=True)
class Root:
    """One folder of a library.

    Attributes:
        id: its row id, never reused.
        name: the first component of its files' keys (unless ``bare``); unique in the library.
        path: where it is now, absolute.
        bare: its files are keyed by their path relative to it, with no ``name/`` in front.
    """

    id: int
    name: str
    path: Path
    bare: bool = False

    def key(self, rel: str) -> str:
        """The key of the file at ``rel`` (POSIX, relative to this root)."""
        return rel if self.bare else f"{self.name}/{rel}"

    @property
    def prefix(self) -> str:
        """What every key of this root starts with (empty when bare)."""
        return "" if self.bare else f"{self.name}/"

    def __str__(self) -> str:
        return str(self.path)


def stored_path(root: Path, index_dir: Path) -> str:
    """How a root's location is stored: relative to the index directory when the index lies
    inside the root (the folder can then move with its index), else absolute."""
    if index_dir == root or root in index_dir.parents:
        return os.path.relpath(root, index_dir)
    return str(root)


def located(stored: str, index_dir: Path) -> Path:
    """The absolute location of a root stored as :func:`stored_path` wrote it."""
    path = Path(stored)
    return path if path.is_absolute() else Path(os.path.normpath(index_dir / path))


def unique_name(path: Path, taken: Iterable[str]) -> str:
    """A name for a new root: its folder's name (``photos``), made unique with ``-2``, ``-3``.

    Unique ignoring case: keys become folders under ``duplicates --move-to``, and ``Photos/``
    and ``photos/`` are one folder on a case-insensitive disk.
    """
    base = _NAME_BAD.sub("_", path.name) or "root"
    if base in (".", ".."):
        base = "root"
    taken = {t.casefold() for t in taken}
    name, n = base, 1
    while name.casefold() in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def check_name(name: str) -> str:
    """``name`` if it can name a root (one path component, printable), else a `RootError`."""
    if not name or name in (".", "..") or _NAME_BAD.search(name) or not name.isprintable():
        raise RootError(f"{name!r} cannot name a root: use one folder-like name, without '/'")
    return name


def folder(path: str | os.PathLike) -> Path:
    """``path`` as an absolute, resolved folder that exists, else a `RootError`."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise RootError(f"{p} is not a folder: pass the folder of images to index")
    return p


def overlap(new: Path, roots: Iterable[Path]) -> Path | None:
    """The first of ``roots`` that ``new`` is inside of, or holds (or equals), else None."""
    for old in roots:
        if new == old or old in new.parents or new in old.parents:
            return old
    return None


def check_disjoint(paths: Sequence[Path], existing: Iterable[Path] = ()) -> None:
    """Refuses roots that nest: one inside another would index its files twice, under two keys.

    Raises:
        RootError: two of ``paths``, or one of them and one of ``existing``, overlap.
    """
    seen = list(existing)
    for p in paths:
        other = overlap(p, seen)
        if other is not None:
            how = "is" if p == other else "is inside" if other in p.parents else "holds"
            raise RootError(
                f"{p} {how} {other}, already a root of this library: roots must not overlap "
                "(index the outer folder alone, or remove a root with `mocoretrieval roots "
                "remove`)"
            )
        seen.append(p)


class Roots(Sequence[Root]):
    """The roots of one library, in id order, with the key <-> path mapping."""

    def __init__(self, roots: Iterable[Root]) -> None:
        self._roots = sorted(roots, key=lambda r: r.id)
        self._by_name = {r.name: r for r in self._roots}

    def __getitem__(self, i):  # type: ignore[override]
        return self._roots[i]

    def __len__(self) -> int:
        return len(self._roots)

    def __iter__(self) -> Iterator[Root]:
        return iter(self._roots)

    def __str__(self) -> str:
        return ", ".join(str(r.path) for r in self._roots)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Roots) and self._roots == other._roots

    def locate(self, key: str) -> tuple[Root, str] | None:
        """``(root, path relative to it)`` of a key, or None when no root of the library has it
        (a key of a removed root, or a forged one)."""
        if len(self._roots) == 1 and self._roots[0].bare:
            return self._roots[0], key
        name, sep, rel = key.partition("/")
        root = self._by_name.get(name)
        if root is None or root.bare or not sep or not rel:
            return None
        return root, rel

    def absolute(self, key: str) -> Path | None:
        """Where the file of ``key`` is now (root location + relative path), or None."""
        found = self.locate(key)
        return None if found is None else found[0].path / found[1]

    def containing(self, path: str | os.PathLike) -> tuple[Root, str] | None:
        """``(root, POSIX path relative to it)`` of an absolute path, or None when it is under
        no root (checked on the path as given, without following links)."""
        p = Path(os.path.abspath(os.path.expanduser(path)))
        for root in self._roots:
            if root.path in p.parents:
                return root, p.relative_to(root.path).as_posix()
        return None

    def find(self, what: str | os.PathLike) -> Root:
        """The root named ``what``, or at the folder ``what``.

        Raises:
            RootError: none is.
        """
        text = os.fspath(what)
        if text in self._by_name:
            return self._by_name[text]
        p = Path(os.path.abspath(os.path.expanduser(text)))
        for root in self._roots:
            if root.path == p or root.path == p.resolve():
                return root
        known = ", ".join(f"{r.name} ({r.path})" for r in self._roots) or "none"
        raise RootError(f"{text} is not a root of this library; its roots: {known}")

    def keys_of(self, root: Root, keys: Iterable[str]) -> list[str]:
        """The keys among ``keys`` that belong to ``root``."""
        return [k for k in keys if (found := self.locate(k)) is not None and found[0] == root]
