"""FAISS index choice, building, search-parameter tuning and atomic saving; faiss imported lazily.

Every index is an ``IDMap`` over an inner-product index, so FAISS returns the store's vector ids
directly; with L2-normalised vectors the inner product is the cosine similarity.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import IndexFormatError, MoCoRetrievalError

log = logging.getLogger(__name__)

# Exact search below this many vectors. A flat scan of 50k x 2048-d vectors is ~0.2 GFLOP per
# query (tens of ms on a laptop core) and needs no training or tuning; past it an IVF index
# pays off (FAISS wiki, "Guidelines to choose an index": flat for < 1M only if brute force is
# fast enough).
EXACT_MAX = 50_000
TARGET_RECALL = 0.95  # recall@10 against exact search, measured on a sample of stored vectors
TUNE_QUERIES = 256  # ~0.4 % standard error on a recall near 0.95 (256 x 10 neighbours)
TUNE_K = 10
# IVF training sample: the FAISS guidelines ask for 30*K to 256*K points for K centroids, and
# FAISS warns below 39*K. k-means is most of the build time, so take the low end.
TRAIN_PER_LIST = 40
# Training sample of an index without lists that needs training (e.g. "PQ64", "PCA128,Flat"):
# the top of the same guideline for the 256 centroids of a PQ sub-quantizer (256 * 256).
TRAIN_MAX = 65_536
# Candidates re-ranked exactly per result wanted (k_factor_rf), tried in turn until nprobe can
# reach the target: 4 recovers the recall lost to 4-bit codes at the same nprobe as a float
# IVF (measured: 0.954 vs 0.958 at 200k x 512); fewer dimensions need more.
REFINE_FACTORS = (4, 8, 16, 32)


def faiss_module():
    """Imports faiss, or says how to install it."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise MoCoRetrievalError("faiss is not installed: `pip install faiss-cpu`") from e
    return faiss


def auto_factory(n: int, dim: int) -> str:
    """The FAISS factory string the index uses for ``n`` vectors when none is given.

    Exact ``Flat`` up to :data:`EXACT_MAX`. Beyond, an inverted file with K = 4 * sqrt(n) lists,
    the low end of the FAISS guideline range (4 to 16 * sqrt(n)): fewer, larger lists train
    faster. The lists hold 4-bit PQ fast-scan codes (one sub-quantizer per 4 dimensions) whose
    candidates are re-ranked with the exact vectors (``RFlat``, :data:`REFINE_FACTORS`): André
    et al., "Quicker ADC", TPAMI 2019. Measured here at 200k x 512 and recall@10 0.95, nprobe
    128 of 1800 lists: p50 0.34 ms against 2.87 ms for the same lists holding float vectors.

    Past :func:`mocoretrieval.ondisk_plan.wants_ondisk` (millions of vectors, or an in-RAM index
    over its RAM budget) the lists go to disk and the re-ranking reads the stored vectors:
    ``ondisk:OPQ{m},IVF{K},PQ{m}x8`` up to 512-d, without the rotation above
    (:func:`mocoretrieval.ondisk_plan.factory_for`).
    """
    from . import ondisk_plan

    if n <= EXACT_MAX:
        return "Flat"
    if ondisk_plan.wants_ondisk(n, dim):
        return ondisk_plan.factory_for(n, dim)
    lists = round(4 * math.sqrt(n))
    if dim % 4:
        return f"IVF{lists},Flat"
    return f"IVF{lists},PQ{dim // 4}x4fs,RFlat"


def check_factory(factory: str, dim: int) -> None:
    """Raises a clear error when ``factory`` is not a FAISS factory string for ``dim``-d vectors."""
    from . import ondisk_plan

    if factory == "auto":
        return
    if ondisk_plan.is_ondisk(factory):
        ondisk_plan.check(factory, dim)
        return
    faiss = faiss_module()
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise MoCoRetrievalError(
            f"--index-type {factory!r} is not a FAISS factory string for {dim}-d vectors "
            f"({_first_line(e)}); try 'Flat', 'IVF1024,Flat' or 'HNSW32,Flat'"
        ) from e


def check_buildable(factory: str, n: int, dim: int) -> None:
    """Raises a clear error, before any work, when ``factory`` cannot be trained on ``n``
    vectors: an IVF index needs at least one vector per list (k-means)."""
    from . import ondisk_plan

    check_factory(factory, dim)
    if factory in ("auto", ondisk_plan.PREFIX):
        return
    inner = ondisk_plan.inner(factory) if ondisk_plan.is_ondisk(factory) else factory
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(faiss.index_factory(dim, inner, faiss.METRIC_INNER_PRODUCT))
    if ivf is not None and n < ivf.nlist:
        raise MoCoRetrievalError(
            f"--index-type {factory!r} has {ivf.nlist} lists and needs at least as many images; "
            f"the folder has {n}: use fewer lists (e.g. 'IVF{max(1, n // 40)},Flat') or "
            "'auto' (the default)"
        )


@dataclass
class BuiltIndex:
    """A FAISS index with what it was built from and how it searches."""

    index: Any
    factory: str
    params: dict[str, int] = field(default_factory=dict)  # e.g. {"nprobe": 16}
    recall: float | None = None  # measured recall@10 of the tuned parameters; None when exact
    trained_on: int | None = None  # vectors in the collection when it was trained, if trained
    seconds: float = 0.0


class VectorSource(Protocol):
    """Vectors read chunk by chunk, as many times as a build needs, every pass the same rows in
    the same order (e.g. :meth:`mocoretrieval.store.Store.snapshot_chunks`)."""

    n: int
    dim: int

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(ids (m,) int64, vectors (m, D) float32)``."""
        ...


class ArraySource:
    """Vectors already in memory, as a :class:`VectorSource`."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, chunk: int = 65536) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, self.dim = self.vectors.shape
        self.chunk = chunk

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.n, self.chunk):
            yield self.ids[start : start + self.chunk], self.vectors[start : start + self.chunk]


def build(
    ids: np.ndarray,
    vectors: np.ndarray,
    factory: str,
    *,
    seed: int = 0,
    tune: bool = True,
    trained: BuiltIndex | None = None,
) -> BuiltIndex:
    """:func:`build_from` over vectors in memory: ``ids`` (N,) int64 and ``vectors`` (N, D)
    float32, L2-normalised."""
    return build_from(ArraySource(ids, vectors), factory, seed=seed, tune=tune, trained=trained)


def build_from(
    source: VectorSource,
    factory: str,
    *,
    seed: int = 0,
    tune: bool = True,
    trained: BuiltIndex | None = None,
) -> BuiltIndex:
    """Builds (trains, fills and tunes) an ``IDMap`` index over the vectors of ``source``.

    Memory is bounded, not proportional to N: the index is trained on a sample (at most
    :data:`TRAIN_PER_LIST` per IVF list, or :data:`TRAIN_MAX`), filled one chunk at a time,
    and tuned with :data:`TUNE_QUERIES` queries whose exact neighbours are found chunk by chunk.
    Only the FAISS index itself grows with N.

    Args:
        source: the ids (returned by searches) and L2-normalised vectors, read in chunks.
        factory: a FAISS factory string (without ``IDMap``), e.g. ``Flat`` or ``IVF4096,Flat``.
        seed: for the training sample and the tuning sample.
        tune: tune nprobe / efSearch for :data:`TARGET_RECALL` recall@10.
        trained: an earlier index of the same factory whose training (IVF centroids, PQ
            codebooks) is kept: it is emptied and refilled, which skips k-means.
    """
    faiss = faiss_module()
    t0 = time.perf_counter()
    n, dim = source.n, source.dim
    trained_on = None
    try:
        if trained is not None:
            index, trained_on = trained.index, trained.trained_on
            index.reset()
        else:
            index = faiss.index_factory(dim, "IDMap," + factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            trained_on = n
            rng = np.random.default_rng(seed)
            ivf = faiss.try_extract_index_ivf(index)
            n_train = min(n, TRAIN_MAX if ivf is None else TRAIN_PER_LIST * ivf.nlist)
            rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, False))
            index.train(_gather(source, rows)[1])
        added = 0
        for ids, vectors in source.chunks():
            index.add_with_ids(vectors, ids)
            added += len(ids)
    except RuntimeError as e:
        raise MoCoRetrievalError(
            f"FAISS could not build {factory!r} over {n} vectors ({_first_line(e)}); "
            "an IVF index needs at least as many vectors as lists: use a smaller one or leave "
            "--index-type out for the automatic choice"
        ) from e
    if added != n:
        raise MoCoRetrievalError(f"{n} vectors were announced and {added} read; build again")
    built = BuiltIndex(index=index, factory=factory, trained_on=trained_on)
    if tune:
        built.params, built.recall = tune_search(index, source, seed=seed)
        if built.recall is not None and built.recall < TARGET_RECALL:
            log.warning(
                "%s reaches recall@10 %.3f only (%s), below %.2f",
                factory,
                built.recall,
                built.params,
                TARGET_RECALL,
            )
    else:
        built.params = _fixed_params(index)[0]
        set_params(index, built.params)
    built.seconds = time.perf_counter() - t0
    return built


def _gather(source: VectorSource, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` at the sorted positions ``rows`` of ``source``, in one pass."""
    ids_out = np.empty(len(rows), dtype=np.int64)
    out = np.empty((len(rows), source.dim), dtype=np.float32)
    start = done = 0
    for ids, vectors in source.chunks():
        end = start + len(ids)
        upto = int(np.searchsorted(rows, end))
        local = rows[done:upto] - start
        ids_out[done:upto], out[done:upto] = ids[local], vectors[local]
        done, start = upto, end
    if done != len(rows):
        raise MoCoRetrievalError(f"{source.n} vectors were announced and {start} read; try again")
    return ids_out, out


def _exact_neighbours(queries: np.ndarray, source: VectorSource, k: int) -> np.ndarray:
    """(len(queries), k) ids of each query's ``k`` nearest vectors by inner product, found one
    chunk at a time (-1 pads a source of fewer than ``k``)."""
    faiss = faiss_module()
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in source.chunks():
        scores, pos = faiss.knn(
            queries, vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(scores, np.where(pos >= 0, ids[pos], -1))
    heap.finalize()
    return heap.I


def _fixed_params(index: Any) -> list[dict[str, int]]:
    """Settings to try in turn, each then tuned: the re-ranking depths of a refined index."""
    if hasattr(index, "fixed_options"):  # re-ranked from the store (mocoretrieval.rerank)
        return index.fixed_options()
    faiss = faiss_module()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(inner, faiss.IndexRefine):
        return [{"k_factor_rf": k} for k in REFINE_FACTORS]
    return [{}]


def _search_knob(index: Any) -> tuple[str, list[int]] | None:
    """The speed/recall parameter of ``index`` and the values to try, smallest first."""
    faiss = faiss_module()
    index = getattr(index, "base", index)  # a re-ranking wrapper tunes its base's nprobe
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # Steps of 1.5x-1.33x (1, 2, 3, 4, 6, 8, 12, ...): latency grows linearly with nprobe,
        # so a finer grid than powers of two saves up to a third at the target recall.
        steps = sorted({m * 2**i for i in range(20) for m in (2, 3)} | {1})
        return "nprobe", [v for v in steps if v < ivf.nlist] + [ivf.nlist]
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if hasattr(inner, "hnsw"):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    return None


def set_params(index: Any, params: dict[str, int]) -> None:
    """Applies search parameters (``nprobe``, ``efSearch``) through any wrapper."""
    if hasattr(index, "set_search_params"):  # re-ranked from the store (mocoretrieval.rerank)
        index.set_search_params(params)
    elif params:
        faiss = faiss_module()
        space = faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(index, name, value)


def tune_search(
    index: Any, source: VectorSource, *, seed: int = 0
) -> tuple[dict[str, int], float | None]:
    """Smallest nprobe / efSearch whose recall@10 against exact search reaches the target.

    The queries are a sample of the vectors of ``source``, their exact neighbours found chunk by
    chunk; each one's own id is left out of both result lists, so the trivial self-match does not inflate the recall. A refined index tries each
    re-ranking depth and keeps the one that needs the smallest nprobe: scanning lists is the
    cost, re-ranking a few hundred vectors is not. The chosen parameters are left set.

    Returns:
        the parameters (those of the best recall when none reaches the target), and their
        recall (None for an exact index).
    """
    fixed_options = _fixed_params(index)
    knob = _search_knob(index)
    if knob is None or source.n <= TUNE_K:
        set_params(index, fixed_options[0])
        return dict(fixed_options[0]), None
    name, values = knob
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(source.n, min(TUNE_QUERIES, source.n), replace=False))
    query_ids, queries = _gather(source, q)
    exact_ids = _exact_neighbours(queries, source, TUNE_K + 1)
    exact = [_top(row, qid) for row, qid in zip(exact_ids, query_ids)]
    total = max(1, sum(len(e) for e in exact))

    def recall_of(params: dict[str, int]) -> float:
        set_params(index, params)
        _, found = index.search(queries, TUNE_K + 1)
        return sum(len(e & _top(row, qid)) for e, row, qid in zip(exact, found, query_ids)) / total

    best: dict[str, int] = {}
    best_recall = -1.0
    for fixed in fixed_options:
        for value in values:
            if best_recall >= TARGET_RECALL and value >= best[name]:
                break  # cannot need less scanning than the best setting so far
            params = {**fixed, name: value}
            recall = recall_of(params)
            if recall >= TARGET_RECALL:
                best, best_recall = params, recall
                break
            if value == values[-1] and recall > best_recall:
                best, best_recall = params, recall
    set_params(index, best)
    return best, best_recall


def _top(row: np.ndarray, query_id: int) -> set[int]:
    """The first :data:`TUNE_K` ids of a result row, without the query itself and padding."""
    return set([int(i) for i in row if i != query_id and i >= 0][:TUNE_K])


def save(index: Any, path: str | Path) -> int:
    """Writes ``index`` atomically (temporary file, fsync, rename); returns its size in bytes."""
    from .layout import replace_atomic

    faiss = faiss_module()
    path = Path(path)
    replace_atomic(path, lambda tmp: faiss.write_index(index, tmp))
    return path.stat().st_size


def load(path: str | Path) -> Any:
    """Reads a FAISS index; raises :class:`IndexFormatError` when it is missing or corrupt."""
    faiss = faiss_module()
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise IndexFormatError(f"cannot read FAISS index {path}: {_first_line(e)}") from e


def neighbour_pairs(
    index: Any, ids: np.ndarray, vectors: np.ndarray, threshold: float, cap: int
) -> Iterator[tuple[int, int, float]]:
    """Yields ``(query id, neighbour id, score)`` with score >= threshold among each query's
    ``cap`` nearest neighbours, self-pairs left out.

    A k-NN search, not a range search: in a cluster of n alike images a range search returns
    n^2 pairs (3,000 photos of one scene: 9 million, 0.7 GB); with a cap the work and memory
    are at most ``len(ids) * cap``. The groups built from these pairs stay connected, since
    every member links to its nearest alike ones.
    """
    scores, found = index.search(vectors, min(cap + 1, index.ntotal))  # +1: the query itself
    for qid, row_s, row_i in zip(ids.tolist(), scores, found):
        for nid, s in zip(row_i.tolist(), row_s.tolist()):
            if nid != qid and nid >= 0 and s >= threshold:
                yield qid, nid, float(s)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
