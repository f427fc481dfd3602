"""Issue 13, defect 10: near-duplicates in a dense cluster cost N x cap, not N^2."""

from __future__ import annotations

import numpy as np

from mocoretrieval import ann
from mocoretrieval import index as index_module
from mocoretrieval.index import ImageIndex
from mocoretrieval.store import FileStat, Store

N = 600  # alike images, one cluster
CAP = getattr(index_module, "DUPLICATE_NEIGHBOURS", 32)


def test_a_dense_cluster_is_one_group_at_bounded_cost(indexed, monkeypatch):
    """Fails without the fix: the range search returned every pair of the cluster (N^2)."""
    index = ImageIndex.open(indexed)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(index.dim).astype(np.float32)
    alike = base + 0.01 * rng.standard_normal((N, index.dim)).astype(np.float32)
    alike /= np.linalg.norm(alike, axis=1, keepdims=True)
    writer = Store(index.store.path, index.dim)
    writer.add_batch([f"burst/{i:04d}.jpg" for i in range(N)], alike, [FileStat(1, 1)] * N)
    writer.close()
    pairs = []
    for name in ("pairs_above", "neighbour_pairs"):  # whichever the index uses, counted
        real = getattr(ann, name, None)
        if real is not None:

            def counted(*args, _real=real, **kwargs):
                for pair in _real(*args, **kwargs):
                    pairs.append(pair)
                    yield pair

            monkeypatch.setattr(ann, name, counted)
    groups = index.duplicates(0.95, batch=256)
    assert len(pairs) <= (N + 8) * CAP
    burst = [g for g in groups if any("/burst/" in r.path for r in g)]
    assert len(burst) == 1 and len(burst[0]) == N  # the cluster is still one group
    seen = []
    index.duplicates(0.95, batch=256, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (N + 8, N + 8)  # the CLI's progress bar


def test_the_app_has_a_floor_on_the_threshold(indexed):
    from app import views

    index = ImageIndex.open(indexed)
    asked = []
    index.duplicates = lambda threshold: asked.append(threshold) or []
    views.find_duplicates(index, 0.1)
    assert asked == [views.MIN_DUPLICATE_THRESHOLD]
