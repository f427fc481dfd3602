"""`Store`: the SQLite database of an index — one row per file, its embedding, and a generation.

The store knows nothing of models or FAISS. Each batch of embeddings is written in one
transaction together with its file rows, so a crash (Ctrl-C, kill -9, power cut) loses at most
the batch in flight and never leaves a row without its vector or a vector without its row.
Every transaction that changes the set of vectors bumps ``generation``; the FAISS index records
the generation it was built from, which is how a stale FAISS file is detected.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import IndexFormatError, MoCoRetrievalError
from .store_db import (
    DEFAULT_STORE_DTYPE,
    FRAMES_SCHEMA,
    NOT_DUPLICATES_SCHEMA,
    SCHEMA,
    SCHEMA_VERSION,
    THUMBNAILS_SCHEMA,
    check_dtype,
    connect_readonly,
    database_error,
    encode_vectors,
    read_dtype,
    write_dtype,
)
from .store_frames import FramesReading
from .store_reads import (
    FileRecord,
    FileStat,
    VectorReading,
)


class Store(VectorReading, FramesReading):
    """The SQLite database of one index directory.

    Args:
        path: the database file; created with its schema when missing.
        dim: the embedding dimension, checked on every write.
        readonly: open without writing anything (searching a read-only index).
        dtype: how a new database holds its vectors, ``float32`` (the default) or ``float16``
            (half the bytes); an existing one keeps the encoding it records (:meth:`clear`
            changes it). Vectors are read back as float32 either way.

    Raises:
        MoCoRetrievalError: ``dtype`` is not the encoding of the existing database.
    """

    def __init__(
        self, path: str | Path, dim: int, *, readonly: bool = False, dtype: str | None = None
    ) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self._lock = threading.Lock()  # one connection shared by threads (e.g. a web app)
        self.readonly = readonly
        try:
            if readonly:
                self._db = connect_readonly(self.path)
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False)
                # WAL: readers never block the writer; FULL: a committed batch survives a power
                # cut, not only a process crash (https://www.sqlite.org/wal.html).
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._create_schema(check_dtype(dtype or DEFAULT_STORE_DTYPE))
            self._check_schema()
            recorded = read_dtype(self._db, self.path)
            if not readonly:
                with self._db:
                    self._db.executescript(
                        THUMBNAILS_SCHEMA + NOT_DUPLICATES_SCHEMA + FRAMES_SCHEMA
                    )
        except sqlite3.Error as e:
            raise database_error(self.path, e) from e
        if dtype is not None and dtype != recorded:
            self._db.close()
            raise MoCoRetrievalError(
                f"{self.path} stores {recorded} vectors, not {dtype}: re-embed it to change "
                "(`mocoretrieval index ROOT --rebuild --store-dtype ...`)"
            )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction; a full disk or a read-only file becomes a domain error."""
        with self._lock:
            try:
                with self._db:
                    yield
            except sqlite3.OperationalError as e:
                raise database_error(self.path, e) from e

    def _create_schema(self, dtype: str) -> None:
        with self._db:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.executescript(SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
                write_dtype(self._db, dtype)  # and the schema version that encoding needs

    def _check_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise IndexFormatError(
                f"{self.path} has schema version {version}; this mocoretrieval reads up to "
                f"{SCHEMA_VERSION}: upgrade with `pip install -U mocoretrieval`"
            )
        if version < 1:
            raise IndexFormatError(f"{self.path} is not an index database (no schema)")

    def close(self) -> None:
        self._db.close()

    # --- reading -----------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Bumped by every committed change to the set of vectors."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0])

    def files(self) -> dict[str, FileRecord]:
        """Every known file, embedded or skipped, by relative path."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, vector_id, skip_reason FROM files"
            ).fetchall()
        return {r[0]: FileRecord(*r[1:]) for r in rows}

    def file(self, path: str) -> FileRecord | None:
        """What is known of one file (relative path), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, vector_id, skip_reason FROM files WHERE path=?", (path,)
            ).fetchone()
        return FileRecord(*row) if row else None

    @property
    def dtype(self) -> str:
        """How the stored vectors are encoded, ``float32`` or ``float16``; read as float32."""
        with self._lock:
            return read_dtype(self._db, self.path)

    def count(self) -> int:
        """Number of stored vectors (= embedded files)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def skipped(self) -> dict[str, str]:
        """Skipped files and why, by relative path."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, skip_reason FROM files WHERE skip_reason IS NOT NULL ORDER BY path"
            ).fetchall()
        return dict(rows)

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    # --- writing: each public method is one transaction ----------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._writing():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_not_duplicates(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Records pairs of relative paths as not duplicates (in either order; kept once)."""
        rows = [(min(a, b), max(a, b), time.time()) for a, b in pairs if a != b]
        with self._writing():
            self._db.executemany("INSERT OR IGNORE INTO not_duplicates VALUES (?, ?, ?)", rows)

    def add_batch(
        self,
        paths: Sequence[str],
        vectors: np.ndarray,
        stats: Sequence[FileStat],
        skipped: Sequence[tuple[str, str, FileStat]] = (),
        thumbnails: Sequence[bytes | None] = (),
        frames: Sequence[tuple[float, float] | None] = (),
    ) -> None:
        """Commits one batch: embedded files with their vectors (and thumbnails), and skipped
        files with reasons.

        A path already in the store is replaced, its old vector and thumbnail deleted in the same
        transaction.

        Args:
            paths: relative paths of the embedded files.
            vectors: (len(paths), dim) embeddings.
            stats: the size and mtime each embedded file had when it was read.
            skipped: ``(path, reason, stat)`` of the files that could not be embedded.
            thumbnails: a JPEG (or None) per embedded file, aligned with ``paths``; empty for
                none.
            frames: ``(timestamp s, duration s)`` per row of a video's keyframe, None for an
                image, aligned with ``paths``; a video's path repeats once per keyframe, its
                first row becoming ``files.vector_id``. Empty when no row is a video.
        """
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (len(paths), self.dim):
            raise ValueError(f"expected ({len(paths)}, {self.dim}) vectors, got {vectors.shape}")
        if thumbnails and len(thumbnails) != len(paths):
            raise ValueError(f"expected {len(paths)} thumbnails, got {len(thumbnails)}")
        if not np.isfinite(vectors).all():
            raise ValueError("refusing to store non-finite (NaN or infinite) vectors")
        thumbs = thumbnails or [None] * len(paths)
        frame_of = frames or [None] * len(paths)
        now = time.time()
        with self._writing():
            encoded = encode_vectors(vectors, read_dtype(self._db, self.path))
            self._delete_vectors_of([*dict.fromkeys(paths), *(s[0] for s in skipped)])
            written: set[str] = set()
            for path, vector, stat, thumb, frame in zip(paths, encoded, stats, thumbs, frame_of):
                cur = self._db.execute(
                    "INSERT INTO vectors (vector) VALUES (?)", (vector.tobytes(),)
                )
                if frame is not None:
                    self._db.execute(
                        "INSERT INTO frames VALUES (?, ?, ?, ?)", (cur.lastrowid, path, *frame)
                    )
                if path in written:  # a video's later keyframe: the file row holds the first
                    continue
                written.add(path)
                self._db.execute(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, NULL, ?)",
                    (path, stat.size, stat.mtime_ns, cur.lastrowid, now),
                )
                if thumb is not None:
                    self._db.execute("INSERT INTO thumbnails VALUES (?, ?)", (cur.lastrowid, thumb))
            for path, reason, stat in skipped:
                self._db.execute(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, NULL, ?, ?)",
                    (path, stat.size, stat.mtime_ns, reason, now),
                )
            self._bump_generation()

    def remove(self, paths: Sequence[str]) -> None:
        """Forgets files (and their vectors) in one transaction."""
        if not paths:
            return
        with self._writing():
            self._delete_vectors_of(paths)
            self._db.executemany("DELETE FROM files WHERE path=?", [(p,) for p in paths])
            self._bump_generation()

    def clear(self, dtype: str | None = None) -> None:
        """Forgets every file and vector (a rebuild with another model), in one transaction.

        Args:
            dtype: store the vectors from now on as ``float32`` or ``float16``; None keeps the
                store's encoding.
        """
        with self._writing():
            self._db.execute("DELETE FROM files")
            self._db.execute("DELETE FROM vectors")
            self._db.execute("DELETE FROM thumbnails")
            self._db.execute("DELETE FROM frames")
            if dtype is not None:
                write_dtype(self._db, dtype)
            self._bump_generation()

    def vacuum_if_sparse(self, fraction: float = 0.25) -> bool:
        """Rewrites the database (``VACUUM``) when over ``fraction`` of its pages are free, as
        after many deletions; SQLite reuses free pages but never gives them back otherwise.

        Returns:
            Whether it vacuumed. Run by a writer, under the index lock; WAL readers go on.
        """
        with self._lock:
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            total = self._db.execute("PRAGMA page_count").fetchone()[0]
            if not total or free / total <= fraction:
                return False
            try:
                self._db.execute("VACUUM")
            except sqlite3.OperationalError as e:
                raise database_error(self.path, e) from e
        return True

    def _delete_vectors_of(self, paths: Sequence[str]) -> None:
        self._db.executemany(
            "DELETE FROM thumbnails WHERE vector_id = (SELECT vector_id FROM files WHERE path=?)",
            [(p,) for p in paths],
        )
        self._db.executemany(
            "DELETE FROM vectors WHERE id = (SELECT vector_id FROM files WHERE path=?)",
            [(p,) for p in paths],
        )
        # A video's other keyframes (the first is files.vector_id, deleted above).
        self._db.executemany(
            "DELETE FROM vectors WHERE id IN (SELECT vector_id FROM frames WHERE path=?)",
            [(p,) for p in paths],
        )
        self._db.executemany("DELETE FROM frames WHERE path=?", [(p,) for p in paths])

    def _bump_generation(self) -> None:
        self._db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'"
        )
