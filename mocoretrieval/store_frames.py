"""The video side of `Store`: reading the ``frames`` table (a video's keyframes, one vector each).

:class:`FramesReading` is mixed into :class:`~mocoretrieval.store.Store`; the rows are written
by ``Store.add_batch`` (its ``frames`` argument) in the batch's transaction, and deleted with
their file's vectors, so a crash never leaves a frame without its vector or its file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np


class FrameRow(NamedTuple):
    """One stored keyframe of a video."""

    vector_id: int
    path: str
    timestamp: float
    duration: float


class FramesReading:
    """Reads of the ``frames`` table; a store made before videos (opened read-only) has none."""

    # Set by Store.__init__.
    path: Path
    dim: int
    _db: sqlite3.Connection
    _lock: threading.Lock
    _select_in: Callable[[str, Sequence[object]], list[tuple]]
    vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

    def file_count(self) -> int:
        """How many files are embedded: a video counts once, whatever its keyframes
        (``count`` is the vectors, what FAISS holds)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM files WHERE vector_id IS NOT NULL"
            ).fetchone()[0]

    def has_frames(self) -> bool:
        """Whether any video keyframe is stored: one row looked at, whatever the store's size
        (what every search asks)."""
        try:
            with self._lock:
                return self._db.execute("SELECT 1 FROM frames LIMIT 1").fetchone() is not None
        except sqlite3.OperationalError:
            return False

    def frame_times(self, vector_ids: Iterable[int]) -> dict[int, tuple[str, float]]:
        """Vector id -> ``(video path, timestamp s)`` of the ids that are keyframes."""
        wanted = sorted({int(i) for i in vector_ids if i >= 0})
        try:
            rows = self._select_in(
                "SELECT vector_id, path, timestamp FROM frames WHERE vector_id IN ({marks})",
                wanted,
            )
        except sqlite3.OperationalError:
            return {}
        return {r[0]: (r[1], float(r[2])) for r in rows}

    def frames(self, paths: Sequence[str] | None = None) -> list[FrameRow]:
        """The stored keyframes (of ``paths``, or all), by path then time."""
        query = "SELECT vector_id, path, timestamp, duration FROM frames"
        try:
            if paths is None:
                with self._lock:
                    rows = self._db.execute(query).fetchall()
            else:
                rows = self._select_in(query + " WHERE path IN ({marks})", sorted(set(paths)))
        except sqlite3.OperationalError:
            return []
        return sorted((FrameRow(*r) for r in rows), key=lambda r: (r.path, r.timestamp))

    def vectors_by_id(self, vector_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Stored vectors by id, ``(dim,)`` float32 each (unknown ids are left out)."""
        ids, vectors = self.vectors_of(np.asarray(list(vector_ids), dtype=np.int64))
        return dict(zip(ids.tolist(), vectors))
