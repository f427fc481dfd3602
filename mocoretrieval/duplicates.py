"""Near-duplicate groups over stored embeddings: bounded k-NN pairs joined by union-find, each
group sorted into a tier (identical bytes, near-duplicates, similar)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from . import ann
from .store import Store

# Maps a pair of similar vectors to the pair of files to join, or None to drop it.
PairFilter = Callable[[int, int, float], "tuple[int, int, float] | None"]

# Cosine similarity above which two images count as near-duplicates, set for the default
# encoder (moco-v2-r18-photos) on held-out photos among never-trained distractors
# (benchmarks/RESULTS.md, "the default encoder, retrained with extras and flat graphics"): at
# 0.98, the same picture at other sizes is found at precision 1.000 / recall 1.000, copies
# under light edits at 1.000 / 0.996, under the standard edits at 0.969 / 0.952 (five draws
# of the edits pooled); precision and recall both hold 0.95 from 0.979 to 0.980, and the
# higher end is kept, as a false pair costs more than a missed one. Lower it for looser
# matches, at some precision; other encoders have other scales (`mocoretrieval eval
# duplicates` finds theirs).
DEFAULT_DUPLICATE_THRESHOLD = 0.98
# Neighbours looked at per image when grouping near-duplicates: bounds the work of a dense
# cluster (n alike images) to n x 32 pairs instead of n^2.
DUPLICATE_NEIGHBOURS = 32

# A group's tier, strongest first: every member has the same bytes; every member is at least
# the near-duplicate threshold from another; some member only reaches the lower `similar` one.
IDENTICAL, NEAR, SIMILAR = "identical", "near", "similar"
TIERS = (IDENTICAL, NEAR, SIMILAR)
_HASH_CHUNK = 1 << 20


def file_hash(path: str | os.PathLike) -> str:
    """The BLAKE2b (256-bit) hex digest of a file's bytes, read 1 MiB at a time."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """Content hashes by ``(path, size, mtime)``, computed only when asked: a run hashes the
    members of candidate groups, never the library, and a changed file is hashed again."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str) -> str | None:
        """The file's hash, or None when it cannot be read (gone, no permission)."""
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns)
            if key not in self._known:
                self._known[key] = file_hash(path)
        except OSError:
            return None
        return self._known[key]


def group_tier(
    paths: Sequence[str],
    scores: Sequence[float],
    near: float,
    hashes: Callable[[str], str | None],
) -> str:
    """The tier of one group: :data:`IDENTICAL` when every file has the same bytes, else
    :data:`NEAR` when every member's best similarity is at least ``near``, else
    :data:`SIMILAR`.

    Files are hashed only when all of them have one size (bytes cannot match otherwise).
    """
    try:
        sizes = {os.stat(p).st_size for p in paths}
    except OSError:
        sizes = set()
    if len(sizes) == 1:
        digests = {hashes(p) for p in paths}
        if len(digests) == 1 and None not in digests:
            return IDENTICAL
    return NEAR if min(scores) >= near else SIMILAR


def duplicate_groups(
    index: Any,
    store: Store,
    threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    *,
    batch: int = 1024,
    neighbours: int = DUPLICATE_NEIGHBOURS,
    progress: Callable[[int, int], None] | None = None,
    apart: Iterable[tuple[int, int]] = (),
    videos: PairFilter | None = None,
) -> tuple[list[list[int]], dict[int, float]]:
    """Groups of stored vector ids whose similarity is at least ``threshold`` to some member.

    A k-NN search of ``neighbours`` per stored vector, ``batch`` vectors at a time, so the work
    is bounded by N x ``neighbours`` even when thousands of images are alike (see
    :func:`mocoretrieval.ann.neighbour_pairs`). Groups are the connected components of the
    "similar enough" pairs (union-find).

    Args:
        index: the FAISS index of ``store``'s vectors.
        store: the vectors, read ``batch`` at a time.
        progress: called as ``progress(done, total)`` after each batch.
        apart: pairs of ids the user said are not duplicates: never in one group. Pairs that
            touch such an id are joined last, strongest first, and only when no ``apart`` pair
            would end up in one group; the rest are joined as they come.
        videos: maps each pair that touches a video's keyframe to a pair of whole videos (by
            their files' vector ids) or drops it (see :mod:`mocoretrieval.video_duplicates`).

    Returns:
        The groups of two or more ids (unordered), and each grouped id's best similarity to
        another member.
    """
    parent: dict[int, int] = {}
    best: dict[int, float] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int, score: float) -> None:
        parent[find(a)] = find(b)
        best[a] = max(best.get(a, -1.0), score)
        best[b] = max(best.get(b, -1.0), score)

    partners: dict[int, set[int]] = {}
    for a, b in apart:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    deferred: list[tuple[float, int, int]] = []
    total, done = index.ntotal, 0
    for ids, vectors in store.iter_vectors(batch):
        done += len(ids)
        if progress is not None:
            progress(min(done, total), total)
        for pair in ann.neighbour_pairs(index, ids, vectors, threshold, neighbours):
            if videos is not None and (pair := videos(*pair)) is None:
                continue
            qid, nid, score = pair
            if qid in partners or nid in partners:
                deferred.append((score, qid, nid))
            else:
                join(qid, nid, score)
    # Until now no id with partners was joined: each is alone, and no group holds two of them.
    for score, a, b in sorted(deferred, reverse=True):
        ra, rb = find(a), find(b)
        if ra != rb and not _kept_apart(ra, rb, partners, find):
            join(a, b, score)
    groups: dict[int, list[int]] = {}
    for i in best:
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1], best


def _kept_apart(
    ra: int, rb: int, partners: dict[int, set[int]], find: Callable[[int], int]
) -> bool:
    """Whether joining the groups of roots ``ra`` and ``rb`` would put an ``apart`` pair in one."""
    for x, ys in partners.items():
        rx = find(x)
        if rx in (ra, rb) and any(find(y) == (rb if rx == ra else ra) for y in ys):
            return True
    return False


def pairs_of(paths: Collection[str]) -> list[tuple[str, str]]:
    """Every unordered pair of ``paths``, each as ``(smaller, larger)``."""
    ordered = sorted(set(paths))
    return [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :]]
