"""When two videos are duplicates: their durations and all their keyframes agree, in time order.

A video is stored as a few keyframes, each its own vector (see :mod:`mocoretrieval.video`).
The duplicate search finds pairs of similar vectors; one similar frame (a title card, a frame
of a shared scene) must not make two different videos duplicates. :class:`VideoPairs` turns a
pair of frames into a pair of videos only when:

- their durations agree: within :data:`DURATION_TOLERANCE` of the longer, or
  :data:`DURATION_SLACK_S`, whichever is more (a re-encode or a remux shifts the end a little);
- every keyframe of each has a match at least the threshold in the other, and the matches
  keep time order (frame i of one matches frame j, frame i + 1 matches frame j or later).

The pair's score is the weakest of those matches. A video is never grouped with a still image
(a frame of a video and a photo of the same scene are different files to keep); pairs of
still images pass untouched.
"""

from __future__ import annotations

import numpy as np

from .store import Store

DURATION_TOLERANCE = 0.02
DURATION_SLACK_S = 1.0


def durations_agree(a: float, b: float) -> bool:
    """Whether two videos' lengths (seconds) agree by the module's rule."""
    return abs(a - b) <= max(DURATION_SLACK_S, DURATION_TOLERANCE * max(a, b))


def frames_agree(sim: np.ndarray, threshold: float) -> float | None:
    """The weakest best match of ``sim`` ((n, m) similarities of two videos' keyframes, each
    in time order) when every frame of either has a match >= ``threshold`` in the other, in
    time order; else None."""
    if sim.size == 0:
        return None
    weakest = 1.0
    for s in (sim, sim.T):
        best = s.argmax(axis=1)
        scores = s[np.arange(len(s)), best]
        if scores.min() < threshold or (np.diff(best) < 0).any():
            return None
        weakest = min(weakest, float(scores.min()))
    return weakest


class VideoPairs:
    """The pair filter of :func:`~mocoretrieval.duplicates.duplicate_groups` for a store with
    videos: see the module's rule. Made by :meth:`of`; results are cached per pair of videos.

    Args:
        store: the store, read for the frames' vectors.
        threshold: the similarity every keyframe must reach in the other video.
    """

    def __init__(self, store: Store, threshold: float) -> None:
        self.store, self.threshold = store, threshold
        self._video: dict[int, str] = {}  # keyframe vector id -> video path
        self._frames: dict[str, list[int]] = {}  # video path -> vector ids in time order
        self._duration: dict[str, float] = {}
        for row in store.frames():
            self._video[row.vector_id] = row.path
            self._frames.setdefault(row.path, []).append(row.vector_id)
            self._duration[row.path] = row.duration
        # The files row holds the first keyframe's vector: the id duplicates are reported by.
        self._head = {path: min(ids) for path, ids in self._frames.items()}
        self._agree: dict[tuple[str, str], float | None] = {}

    @classmethod
    def of(cls, store: Store, threshold: float) -> VideoPairs | None:
        """The filter for ``store``; None when it holds no video (every pair passes)."""
        return cls(store, threshold) if store.has_frames() else None

    def __call__(self, a: int, b: int, score: float) -> tuple[int, int, float] | None:
        """``(a, b, score)`` for two images; the two videos' file ids and their score when
        they agree; None for a video and an image, two frames of one video, or videos that
        do not agree."""
        va, vb = self._video.get(a), self._video.get(b)
        if va is None and vb is None:
            return a, b, score
        if va is None or vb is None or va == vb:
            return None
        key = (min(va, vb), max(va, vb))
        if key not in self._agree:
            self._agree[key] = self._videos_agree(*key)
        agreed = self._agree[key]
        return None if agreed is None else (self._head[va], self._head[vb], agreed)

    def _videos_agree(self, va: str, vb: str) -> float | None:
        if not durations_agree(self._duration[va], self._duration[vb]):
            return None
        fa, fb = self._frames[va], self._frames[vb]
        vectors = self.store.vectors_by_id(fa + fb)
        if any(i not in vectors for i in fa + fb):  # changed meanwhile: not a safe match
            return None
        sim = np.stack([vectors[i] for i in fa]) @ np.stack([vectors[i] for i in fb]).T
        return frames_agree(sim, self.threshold)
