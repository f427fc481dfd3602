"""FAISS index choice, tuning to the recall target, duplicate pairs and atomic files."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from mocoretrieval import ann
from mocoretrieval.errors import IndexFormatError, MoCoRetrievalError


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """L2-normalised points around random centres: the shape of real image embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(index, queries: np.ndarray, base: np.ndarray, ids: np.ndarray) -> float:
    _, exact = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, 10)
    return np.mean([len(set(ids[e]) & set(f)) / 10 for e, f in zip(exact, found)])


def test_auto_factory_is_exact_then_ivf_with_4_sqrt_n_lists():
    assert ann.auto_factory(10, 512) == "Flat"
    assert ann.auto_factory(ann.EXACT_MAX, 2048) == "Flat"
    assert ann.auto_factory(1_000_000, 2048) == "IVF4000,PQ512x4fs,RFlat"
    assert ann.auto_factory(1_000_000, 510) == "IVF4000,Flat"  # no 4-d sub-quantizers


@pytest.mark.parametrize(
    ("factory", "knob"),
    [("IVF64,Flat", "nprobe"), ("IVF64,PQ8x4fs,RFlat", "nprobe"), ("HNSW16,Flat", "efSearch")],
)
def test_tuned_index_reaches_the_recall_target_on_unseen_queries(factory, knob):
    data = clustered(8000, 32, 100)
    base, queries = data[:7000], data[7000:7300]
    ids = np.arange(10, 7010, dtype=np.int64)  # ids are not positions
    built = ann.build(ids, base, factory)
    refined = {"k_factor_rf"} if "RFlat" in factory else set()
    assert set(built.params) == {knob} | refined
    assert built.recall >= ann.TARGET_RECALL
    if knob == "nprobe":
        assert built.params["nprobe"] < 64  # tuned, not an exhaustive scan
        assert built.trained_on == 7000
    assert recall_at_10(built.index, queries, base, ids) >= 0.9  # holds beyond the tuning sample


def test_trained_index_is_refilled_not_retrained():
    data = clustered(3000, 16, 20)
    first = ann.build(np.arange(2000), data[:2000], "IVF16,Flat")
    quantizer = faiss.extract_index_ivf(first.index).quantizer
    centroids = quantizer.reconstruct_n(0, 16)
    again = ann.build(np.arange(3000), data, "IVF16,Flat", trained=first)
    assert again.index.ntotal == 3000 and again.trained_on == 2000
    np.testing.assert_array_equal(quantizer.reconstruct_n(0, 16), centroids)


def test_exact_index_needs_no_tuning():
    data = clustered(500, 16, 5)
    built = ann.build(np.arange(500), data, "Flat")
    assert built.params == {} and built.recall is None
    scores, found = built.index.search(data[:3], 1)
    assert found[:, 0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_neighbour_pairs_match_brute_force_up_to_the_cap():
    data = clustered(300, 16, 3)
    data[7] = data[3]  # an exact duplicate
    ids = np.arange(100, 400, dtype=np.int64)
    sims = data @ data.T
    expected = {(int(ids[i]), int(ids[j])) for i, j in zip(*np.nonzero(sims >= 0.9)) if i != j}
    flat = ann.build(ids, data, "Flat").index
    got = {(q, n) for q, n, _ in ann.neighbour_pairs(flat, ids, data, 0.9, cap=300)}
    assert got == expected and (103, 107) in got
    capped = list(ann.neighbour_pairs(flat, ids, data, 0.9, cap=32))  # issue 13: bounded work
    assert {(q, n) for q, n, _ in capped} <= expected and (103, 107) in {
        (q, n) for q, n, _ in capped
    }
    assert len(capped) <= 300 * 32


def test_bad_factory_strings_are_clear_errors():
    with pytest.raises(MoCoRetrievalError, match="not a FAISS factory string"):
        ann.check_factory("Bogus99", 16)
    with pytest.raises(MoCoRetrievalError, match="as many vectors as lists"):
        ann.build(np.arange(10), clustered(10, 16, 2), "IVF256,Flat")


def test_save_is_atomic_and_a_corrupt_file_is_refused(tmp_path):
    data = clustered(100, 8, 2)
    built = ann.build(np.arange(100), data, "Flat")
    path = tmp_path / "index.faiss"
    size = ann.save(built.index, path)
    assert path.stat().st_size == size and list(tmp_path.iterdir()) == [path]
    assert ann.load(path).ntotal == 100
    path.write_bytes(b"\0" * 64)
    with pytest.raises(IndexFormatError, match="cannot read"):
        ann.load(path)
