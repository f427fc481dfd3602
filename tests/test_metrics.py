"""Retrieval metrics on hand-made embeddings: known ranks, known kNN votes, known PR curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mocoretrieval.metrics import (
    duplicate_precision_recall,
    knn_scores,
    maximum_spanning_tree,
    pool_precision_recall,
    single_target_scores,
    target_ranks,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _angles(degrees: list[float]) -> np.ndarray:
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


def test_identity_features_score_recall_one():
    gallery = _unit(np.random.default_rng(0).normal(size=(30, 16)))
    s = single_target_scores(*target_ranks(gallery, gallery, np.arange(30)))
    assert s.recall == {1: 1.0, 5: 1.0, 10: 1.0} and s.mean_ap == 1.0 and s.queries == 30


def test_constant_features_score_exactly_chance():
    """Every item ties with the target: recall@k is k / M in expectation, and AP the mean of
    1/rank over ranks 1..M. Counting ties as better (``sim >= t - TIE`` in target_ranks) makes
    recall 0 and fails this test; taking the first of the ties would make it 1."""
    m = 40
    const = np.ones((m, 8), np.float32) / math.sqrt(8)
    s = single_target_scores(*target_ranks(const[:10], const, np.arange(10)))
    assert s.recall == pytest.approx({1: 1 / m, 5: 5 / m, 10: 10 / m})
    assert s.mean_ap == pytest.approx(sum(1 / r for r in range(1, m + 1)) / m)


def test_ranks_with_known_positions():
    gallery = _angles([0, 10, 20, 30])
    query = _angles([19])  # order: 20, 10, 30, 0
    better, tied = target_ranks(query.repeat(4, 0), gallery, np.array([2, 1, 3, 0]))
    assert better.tolist() == [0, 1, 2, 3] and tied.tolist() == [0, 0, 0, 0]
    s = single_target_scores(better, tied, ks=(1, 2))
    assert s.recall == {1: 0.25, 2: 0.5}
    assert s.mean_ap == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


# Six points on the unit circle: A at 0, 10, 20 degrees; B at 90, 100 and one B at 15, inside A.
TOY = _angles([0, 10, 20, 90, 100, 15])
TOY_LABELS = np.array([0, 0, 0, 1, 1, 1])


def test_knn_of_a_hand_checked_toy_set():
    """Leave-one-out by hand. k=1: A0->A10 ok, A10->B15 (5 deg) wrong, A20->B15 wrong,
    B90->B100 ok, B100->B90 ok, B15->A10/A20 wrong: 3/6. k=3 (T=0.1): only B15 is outvoted
    (its 3 neighbours are A), e.g. A20 gets exp(cos10/T)+exp(cos20/T) = 30970 for A against
    exp(cos5/T) = 21200 for B: 5/6. Not leaving each point out (deleting the -inf on the
    diagonal in knn_scores) gives 1.0 at k=1 and fails this test."""
    s = knn_scores(TOY, TOY_LABELS, ks=(1, 3), recall_ks=(1, 2))
    assert s.accuracy[1] == pytest.approx(3 / 6)
    assert s.accuracy[3] == pytest.approx(5 / 6)
    assert s.retrieval.recall[1] == pytest.approx(3 / 6)
    # recall@2: A10 (B15, then A0/A20) and A20 (B15, A10) recover; B15 (A10, A20) does not.
    assert s.retrieval.recall[2] == pytest.approx(5 / 6)
    # MAP@R, R = 2: A0 [A10, B15] -> 1/2; A10 [B15, A0] -> 1/4; A20 [B15, A10] -> 1/4;
    # B90 [B100, A20] -> 1/2; B100 [B90, A20] -> 1/2; B15 [A, A] -> 0.
    assert s.retrieval.mean_ap == pytest.approx((0.5 + 0.25 + 0.25 + 0.5 + 0.5 + 0) / 6)


def test_knn_matches_the_training_monitor():
    """The same protocol as training/knn.py's kNN monitor (a reference implementation)."""
    from training.knn import knn_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[np.arange(300), y] += 1.5
    x = _unit(x)
    bank_x, bank_y, q_x, q_y = x[:200], y[:200], x[200:], y[200:]
    for k in (5, 20):
        loo = knn_scores(x, y, ks=(k,)).accuracy[k]
        ref = knn_accuracy(torch.from_numpy(x), torch.from_numpy(y), k=k)
        assert loo == pytest.approx(ref)
        ours = knn_scores(q_x, q_y, bank_x, bank_y, ks=(k,)).accuracy[k]
        ref = knn_accuracy(
            torch.from_numpy(q_x), torch.from_numpy(q_y), torch.from_numpy(bank_x),
            torch.from_numpy(bank_y), k=k,
        )  # fmt: skip
        assert ours == pytest.approx(ref)


def test_knn_of_a_constant_encoder_is_chance():
    """Ties are broken at random for each query; one order for all queries (a tie-break by
    bank position) gives recall@5 near 1 and fails this test."""
    const = np.ones((400, 4), np.float32) / 2
    labels = np.arange(400) % 4
    s = knn_scores(const, labels, ks=(1, 20))
    assert abs(s.accuracy[1] - 0.25) < 0.08 and abs(s.retrieval.recall[1] - 0.25) < 0.08
    assert abs(s.retrieval.recall[5] - (1 - 0.75**5)) < 0.08
    assert abs(s.retrieval.mean_ap - 0.25**2) < 0.02  # precision p at every rank: MAP@R = p^2


def test_spanning_tree_is_maximal():
    x = _angles([0, 50, 10, 45])
    edges = maximum_spanning_tree(x)
    assert sorted((min(a, b), max(a, b)) for a, b, _ in edges) == [(0, 2), (1, 3), (2, 3)]
    assert sorted(round(math.degrees(math.acos(min(1, s)))) for *_, s in edges) == [5, 10, 35]


def test_duplicate_curve_of_two_pairs():
    """Pairs (0, 10) and (45, 50) degrees are the known duplicates. Thresholds: cos 5 groups
    45-50 (1 right of 1 found, recall 1/2), cos 10 adds 0-10 (2/2, recall 1), cos 35 joins
    all four: 6 pairs found, 2 right."""
    x = _angles([0, 10, 45, 50])
    curve = duplicate_precision_recall(x, ["a", "a", "b", "b"])
    assert curve.positives == 2
    assert np.degrees(np.arccos(np.minimum(curve.thresholds, 1))) == pytest.approx(
        [5, 10, 35], abs=1e-3
    )
    assert curve.precision.tolist() == pytest.approx([1, 1, 2 / 6])
    assert curve.recall.tolist() == pytest.approx([0.5, 1, 1])
    assert curve.threshold_for(0.9) == pytest.approx(math.cos(math.radians(10)))
    assert curve.at(0.999) == (1.0, 0.0)
    assert curve.at(math.cos(math.radians(20))) == pytest.approx((1.0, 1.0))
    assert curve.at(-1) == pytest.approx((2 / 6, 1.0))
    assert curve.found.tolist() == [1, 2, 6] and curve.right.tolist() == [1, 2, 2]


def _cos(*degrees: float) -> list[float]:
    return [math.cos(math.radians(d)) for d in degrees]


def test_pooled_curve_sums_the_pairs_of_every_set():
    """Two sets scored as one measurement. Set a is the two-pair set above; in set b the first
    merge (cos 20) is wrong, and the second (cos 40) adds the one right pair among three.
    At cos 20 the pooled precision is (2 + 0) / (2 + 1) = 2/3; averaging the two sets' ratios
    would give 1/2, and a set that has not merged yet contributes nothing, not a ratio of 1."""
    a = duplicate_precision_recall(_angles([0, 10, 45, 50]), ["a", "a", "b", "b"])
    b = duplicate_precision_recall(_angles([0, 20, 60]), ["x", "y", "x"])
    pooled = pool_precision_recall([a, b])
    assert pooled.positives == 3
    assert pooled.thresholds == pytest.approx(_cos(5, 10, 20, 35, 40), abs=1e-5)
    assert pooled.found.tolist() == [1, 2, 3, 7, 9] and pooled.right.tolist() == [1, 2, 2, 2, 3]
    assert pooled.precision.tolist() == pytest.approx([1, 1, 2 / 3, 2 / 7, 1 / 3])
    assert pooled.recall.tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3, 1])
    assert pooled.threshold_for(0.9) == pytest.approx(_cos(10)[0], abs=1e-5)
    same = pool_precision_recall([a, a])  # one set twice: the same ratios, twice the pairs
    assert same.precision.tolist() == pytest.approx(a.precision.tolist())
    assert same.recall.tolist() == pytest.approx(a.recall.tolist()) and same.positives == 4
