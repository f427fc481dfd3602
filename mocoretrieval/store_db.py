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

# The newest schema this code reads. A float32 store is created at version 1, which every
# release reads; a float16 one at version 2, so that a release from before float16 refuses it
# with "upgrade" instead of misreading its 2-byte values as a vector of another dimension.
SCHEMA_VERSION = 2
# Vector encodings a store can hold -> the schema version a store of that encoding is made at.
STORE_DTYPES = {"float32": 1, "float16": 2}
DEFAULT_STORE_DTYPE = "float32"
_LITTLE_ENDIAN = {"float32": "<f4", "float16": "<f2"}
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
    vector BLOB NOT NULL                -- little-endian meta 'vector_dtype', L2-normalised
);
-- 'generation'; 'vector_dtype' (float32 or float16; absent in a store made before float16,
-- which holds float32).
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

# Added the same way (version 1, created on a writable open): the keyframes of videos, each a
# vector of its video's file (see mocoretrieval.video). ``files.vector_id`` holds the first
# frame's vector, so whatever counts or lists files sees a video once; an older reader finds
# the other frames' vectors in FAISS but no file for them, and leaves them out of results.
FRAMES_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    vector_id INTEGER PRIMARY KEY,      -- vectors.id of this keyframe
    path TEXT NOT NULL,                 -- files.path of the video
    timestamp REAL NOT NULL,            -- seconds from the video's start
    duration REAL NOT NULL              -- the video's length in seconds
);
CREATE INDEX IF NOT EXISTS frames_path ON frames (path);
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


def check_dtype(dtype: str) -> str:
    """``dtype`` when a store can hold vectors of it; else a clear error."""
    if dtype not in STORE_DTYPES:
        raise MoCoRetrievalError(
            f"cannot store vectors as {dtype!r}: choose one of {', '.join(STORE_DTYPES)}"
        )
    return dtype


def read_dtype(db: sqlite3.Connection, path: Path) -> str:
    """The vector encoding the database records (float32 when it records none: a store made
    before float16 existed).

    Raises:
        IndexFormatError: an encoding this release does not know.
    """
    row = db.execute("SELECT value FROM meta WHERE key='vector_dtype'").fetchone()
    dtype = row[0] if row else DEFAULT_STORE_DTYPE
    if dtype not in STORE_DTYPES:
        raise IndexFormatError(
            f"{path} stores vectors as {dtype!r}, which this mocoretrieval cannot read: "
            "upgrade with `pip install -U mocoretrieval`"
        )
    return dtype


def write_dtype(db: sqlite3.Connection, dtype: str) -> None:
    """Records ``dtype`` and the schema version it needs, inside the caller's transaction."""
    db.execute("INSERT OR REPLACE INTO meta VALUES ('vector_dtype', ?)", (check_dtype(dtype),))
    db.execute(f"PRAGMA user_version={STORE_DTYPES[dtype]}")


def encode_vectors(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """``vectors`` (n, dim) as rows of ``dtype``, little-endian, ready for ``tobytes``.

    Raises:
        ValueError: a value is not finite, or not once narrowed to ``dtype`` (float16 holds
            up to 65504; an L2-normalised vector never comes near).
    """
    encoded = np.ascontiguousarray(vectors, dtype=_LITTLE_ENDIAN[dtype])
    if not np.isfinite(encoded).all():
        raise ValueError(f"refusing to store non-finite (NaN or infinite) {dtype} vectors")
    return encoded


def decode_vectors(
    rows: list[tuple[int, bytes]], dim: int, path: Path, dtype: str = DEFAULT_STORE_DTYPE
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n,) int64, vectors (n, dim) float32)`` of ``(id, blob)`` rows of ``dtype``:
    float32 whatever the store holds.

    Raises:
        IndexChangedError: a blob is not ``dim`` values of ``dtype``: a writer re-embedded the
            index with another model (or another store dtype) since its manifest was read.
    """
    code = np.dtype(_LITTLE_ENDIAN[dtype])
    if any(len(r[1]) != code.itemsize * dim for r in rows):
        raise IndexChangedError(
            f"{path} holds vectors of another dimension than {dim}: "
            "the index was re-embedded meanwhile; open it again"
        )
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=code).reshape(len(rows), dim)
    return ids, vectors.astype(np.float32)  # a native, writable float32 copy


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
        dtype: how the store holds them (``float32`` or ``float16``); read as float32.
    """

    def __init__(self, db: sqlite3.Connection, path: Path, dim: int, chunk: int) -> None:
        self._db, self.path, self.dim, self.chunk = db, path, dim, chunk
        db.execute("BEGIN")  # deferred: a read transaction, every read one state
        self.generation = int(
            db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
        )
        self.n = int(db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])
        self.dtype = read_dtype(db, path)  # as stored; every chunk comes out float32

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(ids (m,) int64, vectors (m, dim) float32)`` in id order, m <= chunk."""
        for ids, vectors, _ in self._rows("SELECT id, vector, NULL FROM vectors ORDER BY id"):
            yield ids, vectors

    def chunks_with_paths(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """:meth:`chunks` with each vector's file, a path relative to the root, alongside; a
        video's path comes once per keyframe (each a vector, see ``FRAMES_SCHEMA``)."""
        has_frames = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='frames'"
        ).fetchone()
        if not has_frames:  # a store made before videos
            yield from self._rows(
                "SELECT v.id, v.vector, f.path FROM vectors v JOIN files f ON f.vector_id = v.id "
                "ORDER BY v.id"
            )
            return
        yield from self._rows(
            "SELECT v.id, v.vector, COALESCE(f.path, fr.path) FROM vectors v "
            "LEFT JOIN files f ON f.vector_id = v.id LEFT JOIN frames fr ON fr.vector_id = v.id "
            "WHERE f.path IS NOT NULL OR fr.path IS NOT NULL ORDER BY v.id"
        )

    def _rows(self, query: str) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """``query``'s ``(id, blob, path)`` rows decoded, ``chunk`` at a time."""
        cursor = self._db.execute(query)
        try:
            while rows := cursor.fetchmany(self.chunk):
                ids, vectors = decode_vectors(
                    [r[:2] for r in rows], self.dim, self.path, self.dtype
                )
                yield ids, vectors, [r[2] for r in rows]
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
