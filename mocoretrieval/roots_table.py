"""The ``roots`` table of an index database: reading it, creating it from an older index, and the
changes a library's roots go through (add, remove, move), each one transaction.

A table of its own, next to the store's: the store keeps files by key and knows nothing of where
roots are (see :mod:`mocoretrieval.roots`). Writes go through a connection of their own, opened
by a writer under the index lock, so that a root added to a bare library and the prefixing of
its first root's keys commit together or not at all.

An index made before roots existed (manifest format 1) has no table: its one root is the
manifest's ``root``, bare. The first writer to open it creates the table from that (see
:meth:`RootTable.migrate`); readers never write, and read the manifest's root until then.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .roots import Root, RootError, Roots, located, stored_path, unique_name
from .store_db import connect_readonly, database_error

if TYPE_CHECKING:
    from typing_extensions import Self

ROOTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS roots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused
    name TEXT NOT NULL UNIQUE,              -- its files' keys start with 'name/', unless bare
    path TEXT NOT NULL,                     -- absolute, or relative to the index directory
    bare INTEGER NOT NULL DEFAULT 0,        -- 1: keys are paths relative to it (one root only)
    added_at REAL NOT NULL
);
"""


def legacy_root(index_dir: Path, manifest: dict[str, Any]) -> Root:
    """The one root of an index made before the roots table: the manifest's, bare."""
    path = located(manifest["root"], index_dir)
    return Root(1, unique_name(path, ()), path, bare=True)


def _has_table(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='roots'").fetchone()
    return row is not None


def _rows(db: sqlite3.Connection, index_dir: Path) -> Roots:
    rows = db.execute("SELECT id, name, path, bare FROM roots ORDER BY id").fetchall()
    return Roots(Root(i, name, located(p, index_dir), bool(bare)) for i, name, p, bare in rows)


def read_roots(database: Path, index_dir: Path, manifest: dict[str, Any]) -> Roots:
    """The roots of the index at ``index_dir``, read without writing anything."""
    try:
        db = connect_readonly(database)
    except sqlite3.Error as e:
        raise database_error(database, e) from e
    try:
        if _has_table(db):
            return _rows(db, index_dir)
    except sqlite3.Error as e:
        raise database_error(database, e) from e
    finally:
        db.close()
    return Roots([legacy_root(index_dir, manifest)])


class RootTable:
    """The roots table, for writing; only under the index lock.

    Args:
        database: the index database (the store's file).
        index_dir: the index directory, which relative root paths are relative to.
    """

    def __init__(self, database: Path, index_dir: Path) -> None:
        self.database, self.index_dir = database, index_dir
        try:
            self._db = sqlite3.connect(database)
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise database_error(database, e) from e

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()

    def _run(self, *statements: tuple[str, tuple]) -> None:
        try:
            with self._db:
                for sql, args in statements:
                    self._db.execute(sql, args)
        except sqlite3.Error as e:
            raise database_error(self.database, e) from e

    def roots(self) -> Roots:
        try:
            return _rows(self._db, self.index_dir)
        except sqlite3.Error as e:
            raise database_error(self.database, e) from e

    def migrate(self, manifest: dict[str, Any]) -> bool:
        """Creates the table of an index made before it, holding the manifest's root, bare:
        its files' keys stay as they are. Returns whether it did (False: already there)."""
        try:
            if _has_table(self._db):
                return False
            root = legacy_root(self.index_dir, manifest)
            with self._db:
                self._db.executescript(ROOTS_SCHEMA)
                self._db.execute(
                    "INSERT INTO roots (id, name, path, bare, added_at) VALUES (1, ?, ?, 1, ?)",
                    (root.name, manifest["root"], time.time()),
                )
        except sqlite3.Error as e:
            raise database_error(self.database, e) from e
        return True

    def create(self, paths: list[Path]) -> Roots:
        """The table of a new index: one root is bare (keys as before roots), several are not."""
        try:
            with self._db:
                self._db.executescript(ROOTS_SCHEMA)
        except sqlite3.Error as e:
            raise database_error(self.database, e) from e
        for path in paths:
            self.add(path, bare=len(paths) == 1)
        return self.roots()

    def add(self, path: Path, name: str | None = None, *, bare: bool = False) -> Root:
        """Adds the root at ``path`` (already checked not to overlap another).

        When the library's one root is bare, its keys get its name in front in the same
        transaction: two roots cannot both key files by relative path alone.
        """
        roots = self.roots()
        name = name or unique_name(path, (r.name for r in roots))
        if name.casefold() in {r.name.casefold() for r in roots}:
            raise RootError(f"a root is already named {name!r}: pass another --name")
        statements: list[tuple[str, tuple]] = []
        for old in roots:
            if old.bare:
                prefix = f"{old.name}/"
                statements += [
                    ("UPDATE files SET path = ? || path", (prefix,)),
                    ("UPDATE not_duplicates SET a = ? || a, b = ? || b", (prefix, prefix)),
                    ("UPDATE roots SET bare = 0 WHERE id = ?", (old.id,)),
                ]
                if _has_frames(self._db):  # videos' keyframes, keyed like their files
                    statements.append(("UPDATE frames SET path = ? || path", (prefix,)))
        statements.append(
            (
                "INSERT INTO roots (name, path, bare, added_at) VALUES (?, ?, ?, ?)",
                (name, stored_path(path, self.index_dir), int(bare), time.time()),
            )
        )
        self._run(*statements)
        return self.roots().find(name)

    def remove(self, root: Root) -> None:
        """Forgets the root (its files' rows are the store's to remove, after this: a key of
        no root is dropped by the next update)."""
        self._run(("DELETE FROM roots WHERE id = ?", (root.id,)))

    def move(self, root: Root, path: Path) -> Root:
        """Records that the root is now at ``path``; its keys do not change."""
        self._run(
            ("UPDATE roots SET path = ? WHERE id = ?", (stored_path(path, self.index_dir), root.id))
        )
        return self.roots().find(root.name)


def _has_frames(db: sqlite3.Connection) -> bool:
    """Whether the database has the ``frames`` table (a store made before videos has not)."""
    query = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='frames'"
    return db.execute(query).fetchone() is not None
