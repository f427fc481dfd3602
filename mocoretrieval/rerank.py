"""`RerankedIndex`: a compressed FAISS index whose candidates are re-scored exactly from the
stored vectors, instead of from a float32 copy held in RAM (FAISS's ``RFlat``).

At ten million 2048-d photos that copy is 80 GB; the store already holds every vector, so the
re-ranking reads the few hundred it needs per query from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .ann import faiss_module

# ``lookup(ids)`` -> ``(found ids (m,) int64 sorted, vectors (m, D) float32)``; unknown ids are
# left out (e.g. :meth:`mocoretrieval.store.Store.vectors_of`).
Lookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# Candidates re-scored per result wanted, tried in turn by the tuner: as ann.REFINE_FACTORS,
# plus 64, since reading candidates from the store costs less than scanning more lists.
RERANK_FACTORS = (4, 8, 16, 32, 64)
# Queries re-ranked together: (block, k * k_factor, D) float32 candidates in memory at once
# (16 x 320 x 2048 x 4 bytes = 42 MB at most with the largest factor).
QUERY_BLOCK = 16


class RerankedIndex:
    """Searches ``k * k_factor`` candidates in ``base`` and keeps the ``k`` best by exact inner
    product with their stored vectors.

    It has what searching and :func:`mocoretrieval.ann.tune_search` use of a FAISS index:
    ``search``, ``ntotal``, ``d``, the ``base`` whose ``nprobe`` is tuned, and the re-ranking
    depths to try (:meth:`fixed_options`).

    Args:
        base: the compressed index (e.g. IVF-PQ) returning stored vector ids.
        lookup: the stored vectors of a set of ids.
        k_factor: candidates re-ranked per result wanted.
    """

    def __init__(self, base: Any, lookup: Lookup, k_factor: int = RERANK_FACTORS[0]) -> None:
        self.base = base
        self.lookup = lookup
        self.k_factor = k_factor
        # None when not an IVF index: nothing to split per query.
        self._ivf = faiss_module().try_extract_index_ivf(base)

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal)

    @property
    def d(self) -> int:
        return int(self.base.d)

    @property
    def is_trained(self) -> bool:
        return bool(self.base.is_trained)

    def fixed_options(self) -> list[dict[str, int]]:
        """The re-ranking depths the tuner tries in turn, each with its own nprobe."""
        return [{"k_factor": f} for f in RERANK_FACTORS]

    def set_search_params(self, params: dict[str, int]) -> None:
        """Sets ``k_factor`` here and the rest (``nprobe``) on the base index."""
        params = dict(params)
        self.k_factor = int(params.pop("k_factor", self.k_factor))
        if params:
            faiss = faiss_module()
            space = faiss.ParameterSpace()
            for name, value in params.items():
                space.set_index_parameter(self.base, name, value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (nq, k) float32, ids (nq, k) int64)``, best first; -1 pads."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        depth = min(k * self.k_factor, self.ntotal)
        if nq == 0 or depth == 0:
            return scores, ids
        if self._ivf is not None:
            # Fewer queries than threads: each query's probed lists are scanned in parallel
            # (FAISS's parallel_mode 1), so a single query uses every core; otherwise the
            # queries are split between threads (mode 0). At 10M x 256-d, one query at nprobe
            # 128 on 2 cores: p50 9.2 ms -> 6.6 ms (benchmarks/RESULTS.md, "scale"). Both
            # modes return the same results, so concurrent searches racing on it are harmless.
            few = nq < faiss_module().omp_get_max_threads()
            self._ivf.parallel_mode = 1 if few else 0
        _, candidates = self.base.search(queries, depth)  # (nq, depth)
        found, vectors = self.lookup(candidates[candidates >= 0])
        if not len(found):
            return scores, ids
        for start in range(0, nq, QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            cand = candidates[block]
            pos = np.clip(np.searchsorted(found, cand), 0, max(len(found) - 1, 0))
            known = (cand >= 0) & (found[pos] == cand)
            exact = np.einsum("qcd,qd->qc", vectors[pos], queries[block])
            exact = np.where(known, exact, -np.inf).astype(np.float32)  # (b, depth)
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            top_scores = np.take_along_axis(exact, top, axis=1)
            top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(cand, top, axis=1), -1)
            scores[block, : top.shape[1]], ids[block, : top.shape[1]] = top_scores, top_ids
        return scores, ids
