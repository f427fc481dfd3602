"""Retrieval metrics on L2-normalised embeddings: copy detection, kNN classification, duplicates.

Pure functions of arrays: no model, no files. Similarities are inner products (cosines), as the
index searches them. Exact ties — a constant encoder, pixel-identical images — never favour the
item that happens to come first: copy-detection ranks count them in expectation, and kNN
breaks them with a seeded random order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# InstDisc (Wu et al. 2018) and MoCo's kNN monitor: neighbours vote with weight exp(sim / T).
KNN_TEMPERATURE = 0.1
RECALL_KS = (1, 5, 10)
# Similarities this close are ties: float32 products of identical vectors differ by a few ulps
# depending on where BLAS puts them in a batch.
TIE = 1e-6


@dataclass
class RetrievalScores:
    """How well queries find what they should: recall@k and mean average precision.

    Attributes:
        recall: k -> the fraction of queries with a right answer among their first k results.
        mean_ap: mean average precision (with one right answer, the mean reciprocal rank).
        queries: number of queries averaged over.
    """

    recall: dict[int, float]
    mean_ap: float
    queries: int


# --- copy detection: one right answer per query ---------------------------------------------


def target_ranks(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Where each query's target lands when the gallery is sorted by similarity to it.

    Args:
        queries: (Q, D) embeddings.
        gallery: (M, D) embeddings.
        targets: (Q,) the gallery row each query should find.
        chunk: queries per matrix product.

    Returns:
        ``(better, tied)``, both (Q,) int: gallery items scoring strictly above the target, and
        other items scoring exactly as much, which a search may list before it or after it.
    """
    better = np.empty(len(queries), np.int64)
    tied = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), chunk):
        sim = queries[s : s + chunk] @ gallery.T  # (c, M)
        t = sim[np.arange(len(sim)), targets[s : s + chunk]][:, None]  # (c, 1)
        better[s : s + chunk] = (sim > t + TIE).sum(1)
        tied[s : s + chunk] = (np.abs(sim - t) <= TIE).sum(1) - 1
    return better, tied


def single_target_scores(
    better: np.ndarray, tied: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> RetrievalScores:
    """Recall@k and mAP when each query has one right answer, ties broken at random.

    The target's rank is uniform over ``better + 1 .. better + tied + 1``; recall@k and the
    average precision (1 / rank) are their expectations over that draw, so an encoder that
    scores everything the same gets exactly chance: recall@k = k / M.
    """
    if len(better) == 0:
        return RetrievalScores({k: float("nan") for k in ks}, float("nan"), 0)
    better, tied = better.astype(np.float64), tied.astype(np.float64)
    recall = {k: float(np.clip((k - better) / (tied + 1), 0, 1).mean()) for k in ks}
    # E[1 / rank] = (H(better + tied + 1) - H(better)) / (tied + 1), H the harmonic numbers.
    top = int(better.max() + tied.max()) + 1
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])
    lo, hi = better.astype(np.int64), (better + tied + 1).astype(np.int64)
    ap = (harmonic[hi] - harmonic[lo]) / (tied + 1)
    return RetrievalScores(recall, float(ap.mean()), len(better))


# --- kNN classification: every item of the same class is a right answer ---------------------


@dataclass
class KnnScores:
    """Weighted kNN accuracy, same-class recall@k and MAP@R of labeled embeddings.

    Attributes:
        accuracy: k -> top-1 accuracy of the weighted kNN vote (k neighbours, weights
            exp(sim / T), T = :data:`KNN_TEMPERATURE`).
        retrieval: recall@k (a same-class item among the first k) and ``mean_ap`` = MAP@R
            (Musgrave et al. 2020: precision averaged over the first R results, R the number
            of same-class items the query could find).
    """

    accuracy: dict[int, float]
    retrieval: RetrievalScores


def knn_scores(
    queries: np.ndarray,
    labels: np.ndarray,
    bank: np.ndarray | None = None,
    bank_labels: np.ndarray | None = None,
    ks: Sequence[int] = (20, 200),
    recall_ks: Sequence[int] = RECALL_KS,
    temperature: float = KNN_TEMPERATURE,
    seed: int = 0,
    chunk: int = 256,
) -> KnnScores:
    """kNN metrics of ``queries`` against ``bank``; without a bank, leave-one-out on queries.

    Args:
        queries: (Q, D) L2-normalised embeddings.
        labels: (Q,) integer class labels.
        bank: (M, D) embeddings to search, or None to search the queries, each leaving itself
            out (the protocol on a labeled folder).
        bank_labels: (M,) labels of the bank.
        ks: neighbours of the weighted vote, one accuracy each.
        recall_ks: the k of recall@k.
        temperature: the vote's temperature.
        seed: orders exact ties at random, reproducibly.
        chunk: queries per matrix product.
    """
    leave_one_out = bank is None
    if leave_one_out:
        bank, bank_labels = queries, labels
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float64))
    b = torch.from_numpy(np.ascontiguousarray(bank, np.float64))
    qy = torch.from_numpy(np.asarray(labels, np.int64))
    by = torch.from_numpy(np.asarray(bank_labels, np.int64))
    num_classes = int(max(qy.max(), by.max())) + 1
    per_class = torch.bincount(by, minlength=num_classes)
    r = per_class[qy] - int(leave_one_out)  # (Q,) same-class items each query could find
    m = b.shape[0] - int(leave_one_out)
    depth = min(m, max([*ks, *recall_ks, int(r.max())]))
    rng = np.random.default_rng(seed)
    correct = {k: 0 for k in ks}
    hits = {k: 0 for k in recall_ks}
    ap_sum = 0.0
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ b.T  # (c, M)
        # Jitter far below float32's resolution: orders exact ties only, at random per query.
        sim += torch.from_numpy(rng.random(sim.shape) * 1e-12)
        if leave_one_out:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + s] = float("-inf")
        top_sim, top_i = sim.topk(depth, dim=1)  # (c, depth), best first
        match = by[top_i] == qy[s : s + chunk, None]  # (c, depth)
        for k in ks:
            weights = (top_sim[:, :k] / temperature).exp()
            votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64)
            votes.scatter_add_(1, by[top_i[:, :k]], weights)  # (c, classes)
            correct[k] += int((votes.argmax(1) == qy[s : s + chunk]).sum())
        for k in recall_ks:
            hits[k] += int(match[:, :k].any(1).sum())
        rc = r[s : s + chunk]  # (c,)
        pos = torch.arange(1, depth + 1)  # (depth,)
        precision = match.cumsum(1) / pos  # (c, depth)
        within = pos[None] <= rc[:, None]
        ap_sum += float(((precision * match * within).sum(1) / rc.clamp(min=1)).sum())
    n = q.shape[0]
    return KnnScores(
        {k: correct[k] / n for k in ks},
        RetrievalScores({k: hits[k] / n for k in recall_ks}, ap_sum / n, n),
    )


# --- duplicates: precision and recall of thresholded groups --------------------------------


@dataclass
class PrecisionRecall:
    """Pair-level precision and recall of ``duplicates`` grouping at each threshold.

    A pair of images counts as found when ``duplicates(threshold)`` puts them in one group
    (groups are the connected components of the pairs at or above the threshold, so a chain
    of similar images joins its ends), and as right when the known groups have them together.

    Attributes:
        thresholds: descending similarities at which groups merge.
        precision: right pairs / found pairs at each threshold.
        recall: right pairs found / right pairs, at each threshold.
        positives: number of right pairs.
        found: pairs found at each threshold (precision's denominator).
        right: right pairs found at each threshold (the numerator of both).
    """

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    positives: int
    found: np.ndarray
    right: np.ndarray

    def rows(self, thresholds: np.ndarray | float) -> np.ndarray:
        """The row in force at each threshold: the last merge at or above it (-1: none yet)."""
        return np.searchsorted(-self.thresholds, -np.asarray(thresholds), side="right") - 1

    def at(self, threshold: float) -> tuple[float, float]:
        """``(precision, recall)`` of ``duplicates(threshold)``."""
        i = int(self.rows(threshold))
        if i < 0:
            return 1.0, 0.0  # nothing found: no wrong pair either
        return float(self.precision[i]), float(self.recall[i])

    def threshold_for(self, precision: float) -> float | None:
        """The lowest threshold (most recall) whose groups have at least ``precision``."""
        ok = np.nonzero(self.precision >= precision)[0]
        return float(self.thresholds[ok[-1]]) if len(ok) else None


def maximum_spanning_tree(vectors: np.ndarray) -> list[tuple[int, int, float]]:
    """Prim's algorithm on the similarity graph, one row of similarities at a time (no N x N).

    The connected components of the pairs above any threshold are those of the tree's edges
    above it (single linkage), so N - 1 edges replace N(N - 1) / 2 pairs.
    """
    n = len(vectors)
    in_tree = np.zeros(n, bool)
    best = np.full(n, -np.inf)
    parent = np.full(n, -1)
    edges = []
    cur = 0
    for _ in range(n - 1):
        in_tree[cur] = True
        sim = vectors @ vectors[cur]  # (N,)
        closer = ~in_tree & (sim > best)
        best[closer], parent[closer] = sim[closer], cur
        cur = int(np.argmax(np.where(in_tree, -np.inf, best)))
        edges.append((int(parent[cur]), cur, float(best[cur])))
    return edges


def duplicate_precision_recall(vectors: np.ndarray, groups: Sequence[int]) -> PrecisionRecall:
    """Precision and recall of near-duplicate groups at every threshold where groups merge.

    Args:
        vectors: (N, D) embeddings.
        groups: (N,) the known group of each image; an image alone in its group has no
            duplicate.
    """
    groups = list(groups)
    positives = sum(c * (c - 1) // 2 for c in Counter(groups).values())
    parent = list(range(len(groups)))
    members = [Counter([g]) for g in groups]  # component root -> known groups in it

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    found = right = 0
    thresholds, precision, recall, counts = [], [], [], []
    for a, b, sim in sorted(maximum_spanning_tree(vectors), key=lambda e: -e[2]):
        ra, rb = find(a), find(b)
        small, large = sorted((ra, rb), key=lambda r: len(members[r]))
        found += sum(members[ra].values()) * sum(members[rb].values())
        right += sum(c * members[large][g] for g, c in members[small].items())
        members[large].update(members[small])
        parent[small] = large
        if thresholds and thresholds[-1] - sim <= TIE:  # one threshold merges its pairs at once
            thresholds.pop(), precision.pop(), recall.pop(), counts.pop()
        thresholds.append(sim)
        precision.append(right / found)
        recall.append(right / positives if positives else float("nan"))
        counts.append((found, right))
    found_at, right_at = np.array(counts, np.int64).reshape(-1, 2).T
    return PrecisionRecall(
        np.array(thresholds), np.array(precision), np.array(recall), positives, found_at, right_at
    )


def pool_precision_recall(curves: Sequence[PrecisionRecall]) -> PrecisionRecall:
    """The curve of several independent sets scored as one: at each threshold where any of
    them merges groups, the pairs found and the right ones summed over the sets (so a set
    with more pairs weighs more, as in one larger measurement), never averaged ratios."""
    if not curves:
        raise ValueError("no curves to pool")
    thresholds = np.unique(np.concatenate([c.thresholds for c in curves]))[::-1]
    found = np.zeros(len(thresholds), np.int64)
    right = np.zeros(len(thresholds), np.int64)
    for c in curves:
        i = c.rows(thresholds)
        seen = i >= 0
        found[seen] += c.found[i[seen]]
        right[seen] += c.right[i[seen]]
    positives = sum(c.positives for c in curves)
    return PrecisionRecall(
        thresholds,
        right / np.maximum(found, 1),
        right / positives if positives else np.full(len(thresholds), np.nan),
        positives,
        found,
        right,
    )
