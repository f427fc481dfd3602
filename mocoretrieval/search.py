"""Searching an index: query vectors, k-nearest images, duplicate groups and their tiers.

`ImageIndex` takes these methods from :class:`Searching`; they only read the index.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .data import load_image
from .duplicates import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DUPLICATE_NEIGHBOURS,
    NEAR,
    HashCache,
    duplicate_groups,
    group_tier,
)
from .embedder import Embedder
from .errors import ImageError, MoCoRetrievalError, ModelMismatchError
from .pathsafety import inside_root
from .roots import Roots
from .store import Store
from .video import MAX_KEYFRAMES
from .video_duplicates import VideoPairs

Query = str | os.PathLike | Image.Image | np.ndarray


class SearchResult(NamedTuple):
    """One hit: the image's absolute path now (its root's folder joined with its path there),
    its cosine similarity to the query, and its key: its path relative to its root (POSIX, as
    :meth:`ImageIndex.paths` lists it), with the root's name in front in a library of several
    roots (see :mod:`mocoretrieval.roots`). For a video, ``timestamp`` is the time in seconds
    of its keyframe that matched best (see :mod:`mocoretrieval.video`); None for an image."""

    path: str
    score: float
    relpath: str
    timestamp: float | None = None


class DuplicateGroup(list):
    """One group of duplicates: a list of its members (:class:`SearchResult`, best score
    first), so code written for plain lists keeps working, plus what the group is.

    Attributes:
        tier: ``"identical"`` (same bytes), ``"near"`` (every member at least the near-duplicate
            threshold from another) or ``"similar"`` (only the lower ``similar`` threshold);
            see :mod:`mocoretrieval.duplicates`.
        id: 8 hex digits naming the group by its members: the same files give the same id on
            the next run (``mocoretrieval duplicates --not-duplicates ID``).
    """

    def __init__(self, members: Sequence[SearchResult], tier: str = NEAR) -> None:
        super().__init__(members)
        self.tier = tier
        joined = "\0".join(sorted(r.relpath for r in members)).encode("utf-8", "surrogateescape")
        self.id = hashlib.blake2b(joined, digest_size=4).hexdigest()

    @property
    def relpaths(self) -> list[str]:
        return [r.relpath for r in self]


class Searching:
    """The searching half of `ImageIndex`: it reads the store and the FAISS file, never writes."""

    # Set by ImageIndex.__init__ (the roots reloaded by _sync).
    _roots: Roots
    dim: int
    store: Store
    manifest: dict[str, Any]
    # ImageIndex's: the model (loaded when first needed), and the FAISS index of the current
    # manifest (reloaded when another process replaced it).
    encoder: Embedder
    _faiss_index: Callable[[], Any]

    def embed_queries(self, queries: Sequence[Query]) -> np.ndarray:
        """(len(queries), D) L2-normalised query vectors from images, file paths or vectors."""
        out = np.empty((len(queries), self.dim), dtype=np.float32)
        images: list[tuple[int, Image.Image]] = []
        for i, q in enumerate(queries):
            if isinstance(q, Image.Image):
                images.append((i, q))
            elif isinstance(q, (str, os.PathLike)):
                if not os.path.exists(q):
                    raise ImageError("no such file", os.fspath(q))
                images.append(
                    (i, load_image(q, min_side=getattr(self.encoder, "resize_size", None)))
                )
            else:
                v = np.asarray(q, dtype=np.float32).reshape(-1)
                if v.shape[0] != self.dim:
                    raise ModelMismatchError(
                        f"query vector has {v.shape[0]} dimensions; the index holds "
                        f"{self.dim}-d embeddings of {self.manifest['encoder']['source']}"
                    )
                out[i] = v
        for start in range(0, len(images), 32):
            chunk = images[start : start + 32]
            out[[i for i, _ in chunk]] = self.encoder.embed([im for _, im in chunk])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if (norms == 0).any():
            raise MoCoRetrievalError("a query vector is all zeros; it cannot be searched")
        return out / norms

    def search(self, query: Query, k: int = 10) -> list[SearchResult]:
        """The ``k`` images most similar to ``query`` (an image, a file path or a vector)."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[Query], k: int = 10) -> list[list[SearchResult]]:
        """:meth:`search` for several queries at once (faster than one by one)."""
        if k < 1:
            raise MoCoRetrievalError(f"k must be at least 1, got {k}")
        index = self._faiss_index()  # first: it reloads a newer manifest (and model)
        vectors = self.embed_queries(list(queries))
        if index.ntotal == 0:
            return [[] for _ in queries]
        # A video has up to MAX_KEYFRAMES vectors: that many times k hits hold k files.
        videos = self.store.has_frames()
        scores, ids = index.search(vectors, min(k * MAX_KEYFRAMES if videos else k, index.ntotal))
        paths = self._stored_paths(ids.ravel())
        times = self.store.frame_times(ids.ravel()) if videos else {}
        out = []
        for row_s, row_i in zip(scores, ids):
            hits: dict[str, SearchResult] = {}  # the best frame per file: hits come best first
            for s, i in zip(row_s.tolist(), row_i.tolist()):
                if i in paths and paths[i] not in hits and len(hits) < k:
                    t = times.get(i)
                    hits[paths[i]] = self._result(paths[i], s, None if t is None else t[1])
            out.append(list(hits.values()))
        return out

    def _stored_paths(self, vector_ids: Any) -> dict[int, str]:
        """Keys of stored vector ids, normalised; stored keys that leave their root, or are of
        no root (a root removed meanwhile), are left out (see
        :func:`~mocoretrieval.pathsafety.inside_root`)."""
        out: dict[int, str] = {}
        ids = list(vector_ids)
        stored = self.store.paths_of(ids)
        if self.store.has_frames():  # a video's later keyframes have no files row of their own
            stored.update((i, rel) for i, (rel, _) in self.store.frame_times(ids).items())
        for i, rel in stored.items():
            norm = inside_root(rel)
            if norm is not None and self._roots.locate(norm) is not None:
                out[i] = norm
        return out

    def _result(self, rel: str, score: float, timestamp: float | None = None) -> SearchResult:
        return SearchResult(str(self._roots.absolute(rel)), float(score), rel, timestamp)

    def duplicates(
        self,
        threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
        *,
        similar: float | None = None,
        batch: int = 1024,
        neighbours: int = DUPLICATE_NEIGHBOURS,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of near-duplicate images: similarity at least ``threshold`` to some member
        (or ``similar``, when lower), each with its tier.

        A k-NN search of ``neighbours`` per stored vector, ``batch`` vectors at a time, so the
        work is bounded by N x ``neighbours`` even when thousands of images are alike (see
        :func:`mocoretrieval.ann.neighbour_pairs`). Groups are the connected components of the
        "similar enough" pairs (union-find), largest first; each member's score is its best
        similarity to another member. ``progress(done, total)`` is called after each batch.

        Files marked as not duplicates of each other (:meth:`mark_not_duplicates`) are never
        in one group. A group's tier is ``identical`` when all its files have the same bytes
        (hashed only for groups whose files all have one size), ``near`` when every member is
        at least ``threshold`` from another, else ``similar``.
        """
        at = min(threshold, similar) if similar is not None else threshold
        groups, best = duplicate_groups(
            self._faiss_index(),
            self.store,
            at,
            batch=batch,
            neighbours=neighbours,
            progress=progress,
            apart=self.store.not_duplicate_ids(),
            videos=VideoPairs.of(self.store, at),
        )
        paths = self._stored_paths(best)
        hashes = HashCache()
        out = []
        for members in groups:
            found = sorted(
                (self._result(paths[i], best[i]) for i in members if i in paths),
                key=lambda r: (-r.score, r.path),
            )
            if len(found) > 1:
                tier = group_tier(
                    [r.path for r in found], [r.score for r in found], threshold, hashes
                )
                out.append(DuplicateGroup(found, tier))
        return sorted(out, key=lambda g: (-len(g), g[0].path))
