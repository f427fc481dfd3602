"""The reads of a :class:`~mocoretrieval.store.Store` beyond its file rows: vectors (in chunks,
in snapshots, by id, by path), thumbnails and "not duplicates" decisions; the row types the
store returns. A mixin, as :mod:`.store_frames`: the connection and lock are the store's."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .store_db import VectorSnapshot, connect_readonly, database_error, decode_vectors, read_dtype

# Values per ``IN (...)`` list: SQLite caps the parameters of one statement (999 before 3.32).
_IN_CHUNK = 500


class FileRecord(NamedTuple):
    """What the store knows about one file."""

    size: int
    mtime_ns: int
    vector_id: int | None
    skip_reason: str | None


class FileStat(NamedTuple):
    """Size and modification time of a file when it was read: the incremental-update key."""

    size: int
    mtime_ns: int


class StoredThumbnail(NamedTuple):
    """A file's thumbnail with the size and mtime the file had when it was made."""

    stat: FileStat
    jpeg: bytes


class StoredEntry(NamedTuple):
    """One file as a store holds it: its record, and its embedding (float32) and thumbnail
    when it was embedded (None when skipped, or made without a thumbnail)."""

    record: FileRecord
    vector: np.ndarray | None
    thumbnail: bytes | None


class VectorReading:
    """Vector, thumbnail and decision reads of :class:`~mocoretrieval.store.Store`."""

    # Set by Store.__init__.
    path: Path
    dim: int
    readonly: bool
    _db: sqlite3.Connection
    _lock: threading.Lock

    def iter_vectors(self, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(ids (n,) int64, vectors (n, dim) float32)`` chunks in id order."""
        last = -1
        while True:
            with self._lock:
                dtype = read_dtype(self._db, self.path)
                rows = self._db.execute(
                    "SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            ids, vectors = decode_vectors(rows, self.dim, self.path, dtype)
            yield ids, vectors
            last = int(ids[-1])

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector: ``(ids (N,) int64, vectors (N, dim) float32)``, one snapshot."""
        _, ids, vectors = self.snapshot()
        return ids, vectors

    @contextlib.contextmanager
    def snapshot_chunks(self, chunk: int = 8192) -> Iterator[VectorSnapshot]:
        """The stored vectors as of now, to read ``chunk`` rows at a time (see
        :class:`VectorSnapshot`): what a FAISS build reads, never all of them at once.

        Through a connection of its own, so the build neither holds this store's lock (other
        threads go on searching) nor shares its transaction state.
        """
        try:
            if self.readonly:
                db = connect_readonly(self.path)
            else:
                db = sqlite3.connect(self.path, check_same_thread=False)
        except sqlite3.Error as e:
            raise database_error(self.path, e) from e
        try:
            try:
                snapshot = VectorSnapshot(db, self.path, self.dim, chunk)
            except sqlite3.Error as e:
                raise database_error(self.path, e) from e
            yield snapshot
        finally:
            db.rollback()
            db.close()

    def snapshot(self, chunk: int = 8192) -> tuple[int, np.ndarray, np.ndarray]:
        """``(generation, ids (N,) int64, vectors (N, dim) float32)`` read in one transaction.

        A commit by another process in the middle changes nothing of what is returned (WAL
        readers see the database as of their first read). Rows are streamed ``chunk`` at a time
        straight into the output array: memory is the array, not the rows on top of it.

        Raises:
            IndexChangedError: the stored vectors are not ``dim``-dimensional: a writer
                re-embedded the index with another model since its manifest was read.
        """
        with self._lock:
            self._db.execute("BEGIN")  # deferred: a read transaction, every read one state
            try:
                generation = int(
                    self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
                )
                n = self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
                dtype = read_dtype(self._db, self.path)
                ids = np.empty(n, dtype=np.int64)
                vectors = np.empty((n, self.dim), dtype=np.float32)
                cursor = self._db.execute("SELECT id, vector FROM vectors ORDER BY id")
                i = 0
                while rows := cursor.fetchmany(chunk):
                    ids[i : i + len(rows)], vectors[i : i + len(rows)] = decode_vectors(
                        rows, self.dim, self.path, dtype
                    )
                    i += len(rows)
            finally:
                self._db.rollback()
        return generation, ids, vectors

    def _select_in(self, query: str, values: Sequence[object]) -> list[tuple]:
        """The rows of ``query``, whose ``{marks}`` is an ``IN`` list, for all of ``values``:
        run :data:`_IN_CHUNK` values at a time, as SQLite caps the parameters of a statement."""
        rows: list[tuple] = []
        with self._lock:
            for start in range(0, len(values), _IN_CHUNK):
                chunk = values[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += self._db.execute(query.format(marks=marks), chunk).fetchall()
        return rows

    def paths_of(self, vector_ids: Iterable[int]) -> dict[int, str]:
        """Relative paths of the given vector ids (unknown ids are left out)."""
        wanted = sorted({int(i) for i in vector_ids if i >= 0})
        return dict(
            self._select_in(
                "SELECT vector_id, path FROM files WHERE vector_id IN ({marks})", wanted
            )
        )

    def vector(self, path: str) -> np.ndarray | None:
        """The stored embedding of one file, ``(dim,)`` float32, or None if it has none."""
        with self._lock:
            dtype = read_dtype(self._db, self.path)
            row = self._db.execute(
                "SELECT v.id, v.vector FROM files f JOIN vectors v ON v.id = f.vector_id "
                "WHERE f.path=?",
                (path,),
            ).fetchone()
        return None if row is None else decode_vectors([row], self.dim, self.path, dtype)[1][0]

    def entries(self, paths: Sequence[str]) -> dict[str, StoredEntry]:
        """What the store holds of each of ``paths`` that it knows, in one query per
        :data:`_IN_CHUNK` paths: what a merge of shard stores copies (:mod:`.shards`)."""
        rows = self._select_in(
            "SELECT f.path, f.size, f.mtime_ns, f.vector_id, f.skip_reason, v.vector, t.jpeg "
            "FROM files f LEFT JOIN vectors v ON v.id = f.vector_id "
            "LEFT JOIN thumbnails t ON t.vector_id = f.vector_id WHERE f.path IN ({marks})",
            list(paths),
        )
        dtype = self.dtype
        out = {}
        for path, size, mtime_ns, vector_id, reason, blob, jpeg in rows:
            vector = None
            if blob is not None:
                vector = decode_vectors([(vector_id, blob)], self.dim, self.path, dtype)[1][0]
            out[path] = StoredEntry(FileRecord(size, mtime_ns, vector_id, reason), vector, jpeg)
        return out

    def vectors_of(self, vector_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (m,) int64 sorted, vectors (m, dim) float32)`` of the given vector ids, in one
        query per few thousand ids (unknown ids are left out): what exact re-ranking reads."""
        wanted = sorted({int(i) for i in np.asarray(vector_ids).ravel() if i >= 0})
        with self._lock:
            dtype = read_dtype(self._db, self.path)
        rows = self._select_in("SELECT id, vector FROM vectors WHERE id IN ({marks})", wanted)
        rows.sort()
        return decode_vectors(rows, self.dim, self.path, dtype)

    def thumbnails(self, paths: Iterable[str]) -> dict[str, StoredThumbnail]:
        """The stored thumbnails of embedded files, by relative path (files without one, or an
        index built before thumbnails were stored, are left out)."""
        try:
            rows = self._select_in(
                "SELECT f.path, f.size, f.mtime_ns, t.jpeg FROM files f JOIN thumbnails t "
                "ON t.vector_id = f.vector_id WHERE f.path IN ({marks})",
                sorted(set(paths)),
            )
        except sqlite3.OperationalError:  # no such table: opened read-only, pre-thumbnails
            return {}
        return {r[0]: StoredThumbnail(FileStat(r[1], r[2]), r[3]) for r in rows}

    def not_duplicates(self) -> list[tuple[str, str]]:
        """The pairs of relative paths marked as not duplicates, each ``(a, b)`` with a < b."""
        try:
            with self._lock:
                return self._db.execute("SELECT a, b FROM not_duplicates ORDER BY a, b").fetchall()
        except sqlite3.OperationalError:  # no such table: opened read-only, made before it
            return []

    def not_duplicate_ids(self) -> list[tuple[int, int]]:
        """:meth:`not_duplicates` as pairs of the files' current vector ids (pairs of a file
        not embedded now are left out)."""
        try:
            with self._lock:
                return self._db.execute(
                    "SELECT fa.vector_id, fb.vector_id FROM not_duplicates n "
                    "JOIN files fa ON fa.path = n.a JOIN files fb ON fb.path = n.b "
                    "WHERE fa.vector_id IS NOT NULL AND fb.vector_id IS NOT NULL"
                ).fetchall()
        except sqlite3.OperationalError:
            return []
