"""Near-duplicate groups over stored embeddings: bounded k-NN pairs joined by union-find."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ann
from .store import Store

# Cosine similarity above which two images count as near-duplicates, set for the default
# encoder (moco-v2-r18-photos) on held-out photos among never-trained distractors
# (benchmarks/RESULTS.md, "default encoder"): the same picture at other sizes scores >= 0.9989
# (precision and recall 1.000 from 0.97 to 0.998); copies under light edits reach 0.889 recall
# at precision 1.000 here. Lower it for looser matches (crops, edits), at some precision; other
# encoders have other scales (`mocoretrieval eval duplicates` finds theirs).
DEFAULT_DUPLICATE_THRESHOLD = 0.97
# Neighbours looked at per image when grouping near-duplicates: bounds the work of a dense
# cluster (n alike images) to n x 32 pairs instead of n^2.
DUPLICATE_NEIGHBOURS = 32


def duplicate_groups(
    index: Any,
    store: Store,
    threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    *,
    batch: int = 1024,
    neighbours: int = DUPLICATE_NEIGHBOURS,
    progress: Callable[[int, int], None] | None = None,
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

    total, done = index.ntotal, 0
    for ids, vectors in store.iter_vectors(batch):
        done += len(ids)
        if progress is not None:
            progress(min(done, total), total)
        for qid, nid, score in ann.neighbour_pairs(index, ids, vectors, threshold, neighbours):
            parent[find(qid)] = find(nid)
            best[qid] = max(best.get(qid, -1.0), score)
            best[nid] = max(best.get(nid, -1.0), score)
    groups: dict[int, list[int]] = {}
    for i in best:
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1], best
