"""The SQLite side of `Store`: the schema, read-only connections, errors, vector rows.

``store.py`` holds the rows' meaning (what a batch, a removal, a generation are); this module
the SQL text and the plumbing that both it and :class:`VectorSnapshot` (a FAISS build's
reader, on a connection of its own) share.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import DiskFullError, IndexChangedError, IndexFormatError, MoCoRetrievalError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,              -- POSIX path relative to the indexed root
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    vector_id INTEGER UNIQUE,           -- NULL when skipped
    skip_reason TEXT,                   -- NULL when embedded
    indexed_at REAL NOT NULL
);
-- AUTOINCREMENT: a vector id is never reused, so an id from a stale FAISS file can never
-- point at another file's row.
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vector BLOB NOT NULL                -- float32, little-endian, L2-normalised
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Added after schema version 1 without bumping it: an extra table is invisible to older readers,
# and a database without it (an index built before thumbnails) gets it on the next writable
# open; until the files are re-embedded it just has no thumbnails, and the app decodes files.
THUMBNAILS_SCHEMA = """
CREATE TABLE IF NOT EXISTS thumbnails (
    vector_id INTEGER PRIMARY KEY,      -- vectors.id of the file's current embedding
    jpeg BLOB NOT NULL                  -- a small JPEG made when the file was embedded
);
"""
# Added the same way (version 1, created on a writable open): pairs of files the user said are
# not duplicates of each other, by relative path (a < b), so that `duplicates` keeps them apart.
NOT_DUPLICATES_SCHEMA = """
CREATE TABLE IF NOT EXISTS not_duplicates (
    a TEXT NOT NULL,                    -- POSIX path relative to the root, a < b
    b TEXT NOT NULL,
    decided_at REAL NOT NULL,
    PRIMARY KEY (a, b)
);
"""


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection to the database ``path`` that never writes, also in a folder this process
    cannot write."""
    uri = path.resolve().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        if not path.is_file():
            raise
    # A WAL database whose -shm file is gone, in a folder this process cannot write: SQLite
    # reads it only as immutable (https://www.sqlite.org/wal.html#readonly). No writer can
    # be at work in such a folder, so nothing changes under the reader.
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def decode_vectors(
    rows: list[tuple[int, bytes]], dim: int, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n,) int64, vectors (n, dim) float32)`` of ``(id, blob)`` rows.

    Raises:
        IndexChangedError: a blob is not ``dim`` floats: a writer re-embedded the index with
            another model since its manifest was read.
    """
    if any(len(r[1]) != 4 * dim for r in rows):
        raise IndexChangedError(
            f"{path} holds vectors of another dimension than {dim}: "
            "the index was re-embedded meanwhile; open it again"
        )
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
    return ids, vectors.astype(np.float32)  # a native, writable copy


class VectorSnapshot:
    """The stored vectors as of one moment, read ``chunk`` rows at a time, as often as needed.

    It reads through a connection of its own inside one read transaction: a commit meanwhile,
    by any process, is not seen (WAL readers see the database as of their first read), so every
    pass yields the same rows (issue 13, defect 6) while memory stays one chunk (defect 17).
    Made by :meth:`Store.snapshot_chunks`; a :class:`~mocoretrieval.ann.VectorSource`.

    Attributes:
        generation: the store generation of these vectors.
        n: how many there are.
        dim: their dimension.
    """

    def __init__(self, db: sqlite3.Connection, path: Path, dim: int, chunk: int) -> None:
        self._db, self.path, self.dim, self.chunk = db, path, dim, chunk
        db.execute("BEGIN")  # deferred: a read transaction, every read one state
        self.generation = int(
            db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
        )
        self.n = int(db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(ids (m,) int64, vectors (m, dim) float32)`` in id order, m <= chunk."""
        cursor = self._db.execute("SELECT id, vector FROM vectors ORDER BY id")
        try:
            while rows := cursor.fetchmany(self.chunk):
                yield decode_vectors(rows, self.dim, self.path)
        except sqlite3.Error as e:
            raise database_error(self.path, e) from e
        finally:
            cursor.close()


def database_error(path: Path, e: sqlite3.Error) -> MoCoRetrievalError:
    """The domain error for a failed SQLite call: what happened and what to do, in one line.

    Only a damaged file is worth deleting; a full disk or a read-only folder is not.
    """
    text = str(e)
    lower = text.lower()
    if "full" in lower:
        return DiskFullError(
            f"the disk holding {path} is full ({text}); the work committed so far is kept: "
            "free some space and run the same command again"
        )
    if "readonly" in lower or "read-only" in lower or "unable to open" in lower:
        return IndexFormatError(
            f"cannot write the index database {path} ({text}): updating an index needs write "
            f"access to {path.parent}; `search`, `duplicates` and `info` work read-only"
        )
    if "locked" in lower or "busy" in lower:
        return IndexFormatError(
            f"the index database {path} is busy ({text}); wait for the other process and retry"
        )
    if "not a database" in lower or "malformed" in lower or "corrupt" in lower:
        return IndexFormatError(
            f"the index database {path} is damaged ({text}). Delete the index directory and "
            "run `mocoretrieval index` again"
        )
    return IndexFormatError(f"cannot use the index database {path}: {text}")
