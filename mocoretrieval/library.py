"""The roots of an index: listing, adding, removing and moving them, and the key <-> path mapping.

`ImageIndex` takes these methods from :class:`LibraryRoots`. Every change is a writer's: it
takes the index lock before its first change, as :meth:`ImageIndex.update` does, and saves the
manifest after it, so that readers in other processes reload the roots (see ``_sync``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import MoCoRetrievalError
from .faiss_file import FaissFile
from .layout import DATABASE, FORMAT_VERSION, UpdateLock
from .library_walk import held_by_root, offline_reason
from .pathsafety import inside_root
from .roots import Root, RootError, Roots, check_disjoint, check_name, folder, stored_path
from .roots_table import RootTable, read_roots
from .store import Store

log = logging.getLogger(__name__)


class LibraryRoots:
    """The roots half of `ImageIndex`."""

    # Set by ImageIndex.__init__.
    path: Path
    manifest: dict[str, Any]
    store: Store
    faiss: FaissFile
    _roots: Roots
    # Folders to add, asked for by ImageIndex.create and added by update, under the lock.
    _pending_roots: list[Path]
    # ImageIndex's.
    _sync: Callable[[], None]
    _save_manifest: Callable[[], None]
    _writable: Callable[[], None]

    @property
    def roots(self) -> Roots:
        """The library's roots, as the last writer left them."""
        self._sync()
        return self._roots

    @property
    def root(self) -> Path:
        """The first root's folder: the root of a one-root index."""
        return self.roots[0].path

    def _read_roots(self) -> None:
        self._roots = read_roots(self.path / DATABASE, self.path, self.manifest)

    def _apply_roots(self) -> list[str]:
        """Under the lock: makes the roots table of an index made before it, then adds the
        folders :meth:`ImageIndex.create` was asked to add. Returns the roots added."""
        added = []
        with RootTable(self.path / DATABASE, self.path) as table:
            migrated = table.migrate(self.manifest)
            roots = table.roots()
            todo = [p for p in self._pending_roots if p not in {r.path for r in roots}]
            check_disjoint(todo, [r.path for r in roots])
            for p in todo:
                added.append(str(table.add(p).path))
            self._pending_roots = []
            self._roots = table.roots()
        if migrated or added or self.manifest["format_version"] < FORMAT_VERSION:
            # Format 2: an older mocoretrieval would take the keys of a second root for files of
            # the first, and delete them; it refuses the index instead.
            self.manifest["format_version"] = FORMAT_VERSION
            self._save_manifest()
        return added

    @contextlib.contextmanager
    def _roots_writer(self) -> Iterator[RootTable]:
        """The roots table to change, under the lock; then the manifest saved (its ``root``
        names the first root, for people reading it), which tells readers to reload."""
        with UpdateLock(self.path):
            self._sync()
            self._writable()
            self._apply_roots()
            with RootTable(self.path / DATABASE, self.path) as table:
                yield table
                self._roots = table.roots()
            self.manifest["root"] = stored_path(self._roots[0].path, self.path)
            self._save_manifest()

    def add_root(self, path: str | os.PathLike, name: str | None = None) -> Root:
        """Adds a folder to the library; its images are embedded by the next :meth:`update`.

        Args:
            path: the folder.
            name: the first component of its files' keys; default, the folder's name (made
                unique with ``-2``...).

        Raises:
            RootError: not a folder, or it overlaps a root (inside one, holding one), or the
                name is taken.
        """
        p = folder(path)
        if name is not None:
            check_name(name)

        with self._roots_writer() as table:
            check_disjoint([p], [r.path for r in table.roots()])
            return table.add(p, name)

    def remove_root(self, which: str | os.PathLike) -> int:
        """Forgets a root and every entry of its files (the files are not touched).

        Args:
            which: the root's name or folder.

        Returns:
            How many files' entries were forgotten.

        Raises:
            RootError: no such root, or it is the last one (delete the index folder instead).
        """
        with self._roots_writer() as table:
            roots = table.roots()
            root = roots.find(which)
            if len(roots) == 1:
                raise RootError(
                    f"{root.path} is the only root of {self.path}: add another first, or delete "
                    "the index folder to drop everything"
                )
            keys = roots.keys_of(root, self.store.files())
            table.remove(root)  # first: a key of no root is dropped by the next update anyway
            self.store.remove(keys)
            if keys:
                self.store.vacuum_if_sparse()
            self._roots = table.roots()
            self.faiss.refresh(save=True)
        return len(keys)

    def move_root(self, which: str | os.PathLike, new: str | os.PathLike) -> Root:
        """Records that a root's folder moved to ``new``; nothing is re-embedded (the next
        update finds the files unchanged by size and mtime, as a move keeps them).

        Raises:
            RootError: no such root, ``new`` is not a folder, or it overlaps another root.
        """
        p = folder(new)
        with self._roots_writer() as table:
            roots = table.roots()
            root = roots.find(which)
            check_disjoint([p], [r.path for r in roots if r.id != root.id])
            return table.move(root, p)

    def roots_info(self) -> list[dict[str, Any]]:
        """Each root: name, folder, whether it is offline (and why), files indexed."""
        roots = self.roots
        held = held_by_root(roots, self.store.files())
        out = []
        for root in roots:
            reason = offline_reason(root, self.path, held[root.id])
            out.append(
                {
                    "name": root.name,
                    "path": str(root.path),
                    "state": "offline" if reason else "online",
                    "offline_reason": reason,
                    "files": held[root.id],
                }
            )
        return out

    def absolute(self, key: str) -> Path:
        """Where the file of ``key`` (as :meth:`paths` and ``SearchResult.relpath`` give it) is
        now: its root's folder joined with its path there.

        Raises:
            MoCoRetrievalError: the key is of no root of the library, or leaves its root.
        """
        norm = inside_root(key)
        found = self.roots.locate(norm) if norm is not None else None
        if found is None or inside_root(found[1]) is None:
            raise MoCoRetrievalError(f"{key} is not a file of a root of {self.path}")
        return found[0].path / found[1]

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` (absolute, or already a key) as the index keys it: relative to its root,
        POSIX, with the root's name in front in a library of several roots.

        Raises:
            MoCoRetrievalError: the path is not inside a root of the library.
        """
        p = Path(path).expanduser()
        roots = self.roots
        if p.is_absolute():
            found = roots.containing(p)
            if found is None:
                raise MoCoRetrievalError(f"{p} is not inside an indexed folder ({roots})")
            norm = inside_root(found[1])
            key = None if norm is None else found[0].key(Path(norm).as_posix())
        else:
            norm = inside_root(p.as_posix())
            key = Path(norm).as_posix() if norm is not None else None
        if key is None or roots.locate(key) is None:
            raise MoCoRetrievalError(f"{path} is not inside an indexed folder ({roots})")
        return key


def new_roots(paths: Sequence[str | os.PathLike], *, empty: bool = False) -> list[Path]:
    """Folders to make roots of, checked: each exists, none overlaps another (``empty``: none
    is fine)."""
    if not paths and not empty:
        raise RootError("pass at least one folder of images to index")
    out = [folder(p) for p in paths]
    check_disjoint(out)
    return out
