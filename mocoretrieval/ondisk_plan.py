"""When ``auto`` builds the on-disk index type, and with which FAISS factory.

Kept apart from :mod:`mocoretrieval.ondisk` (which builds it, and imports :mod:`~.ann`) so that
:func:`mocoretrieval.ann.auto_factory` can ask without an import cycle.
"""

from __future__ import annotations

import math

from .errors import MoCoRetrievalError

PREFIX = "ondisk"
# Past this many vectors ``auto`` builds on disk. At 5M x 2048-d the in-RAM automatic index
# (4-bit codes + the float32 RFlat copy) is ~41 GB; the store-dtype float16 store is 20 GB.
MIN_VECTORS = 5_000_000
# ... or sooner, when the in-RAM index would take more than this (1M x 2048-d: 8.5 GB, kept).
RAM_BUDGET = 16 << 30
# Up to this dimension the on-disk codes are OPQ-rotated (see factory_for).
OPQ_MAX_DIM = 512


def is_ondisk(factory: str) -> bool:
    """Whether ``factory`` (requested or built) is the on-disk type."""
    return factory == PREFIX or factory.startswith(PREFIX + ":")


def factory_for(n: int, dim: int) -> str:
    """The on-disk factory for ``n`` vectors of ``dim`` dimensions, prefix included.

    K = 2 * sqrt(n) lists (FAISS guideline 4-16 * sqrt(n), halved: each list is a contiguous
    read from disk, and fewer lists train and assign faster), holding 8-bit PQ codes. The codes
    only pick candidates, the stored vectors rank them; scanning the codes is most of a query's
    time, so fewer bytes are faster as long as the candidates stay good. Measured at 10M x
    256-d (``benchmarks/scale.py``; RESULTS.md, "scale: code size and rotation"), one query on
    2 cores at nprobe 128: 64-byte PQ 5.99 ms at recall@10 0.918 (8 candidates per result),
    32-byte PQ 4.95 ms at 0.901 (32 candidates), an OPQ rotation + 32-byte PQ 3.97 ms at 0.919
    (4 candidates). So up to :data:`OPQ_MAX_DIM` dimensions: OPQ and one byte per 8 dimensions
    (at most 32). Above it, OPQ's training grows as d^2-d^3 (~40 min on 2 cores at 2048-d,
    estimated from 2 of its 50 iterations, timed), so: plain PQ, one byte per 4 dimensions (at
    most 64). No RFlat: its float32 copy is the RAM wall.
    """
    lists = max(1, round(2 * math.sqrt(n)))
    rotate = dim <= OPQ_MAX_DIM
    m = min(32, max(1, dim // 8)) if rotate else min(64, dim // 4)
    while dim % m:
        m -= 1
    # The coarse quantizer is a flat scan of the centroids. An HNSW graph over them
    # ("IVF2000_HNSW32", FAISS wiki) assigns faster, but at its default efSearch it returned
    # only ~460 of 2,000 requested lists and capped recall@10 at 0.905 at 1M vectors whatever
    # nprobe or the re-ranking depth (benchmarks/scale.py); force it with ondisk:FACTORY.
    # k-means needs as many points as centroids: a forced small collection gets fewer bits,
    # and no rotation (OPQ trains 8-bit codebooks of its own).
    bits = max(1, min(8, int(math.log2(max(n, 2))) - 2))
    rotation = f"OPQ{m}," if rotate and bits == 8 else ""
    return f"{PREFIX}:{rotation}IVF{lists},PQ{m}x{bits}"


def in_ram_bytes(n: int, dim: int) -> int:
    """Estimated RAM of the in-RAM automatic index: 4-bit codes, ids and the float32 copy."""
    return n * (dim * 4 + dim // 8 + 8)


def wants_ondisk(n: int, dim: int) -> bool:
    """Whether ``auto`` builds on disk: past :data:`MIN_VECTORS`, or past :data:`RAM_BUDGET`."""
    return n >= MIN_VECTORS or in_ram_bytes(n, dim) > RAM_BUDGET


def resolve(factory: str, n: int, dim: int) -> str:
    """``ondisk`` with the factory filled in for ``n`` vectors; any other string unchanged."""
    return factory_for(n, dim) if factory == PREFIX else factory


def inner(factory: str) -> str:
    """The FAISS factory string of an ``ondisk:FACTORY`` type."""
    return factory.split(":", 1)[1]


def check(factory: str, dim: int) -> None:
    """Raises a clear error when an ``ondisk:FACTORY`` is not an IVF factory for ``dim``."""
    if factory == PREFIX:
        return
    import faiss  # lazily, as everywhere: importing this module must stay cheap

    wrapped = inner(factory)
    try:
        index = faiss.index_factory(dim, wrapped, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise MoCoRetrievalError(
            f"--index-type {factory!r}: {wrapped!r} is not a FAISS factory string for {dim}-d "
            "vectors; try 'ondisk' or 'ondisk:IVF1024,PQ32x8'"
        ) from e
    if faiss.try_extract_index_ivf(index) is None:
        raise MoCoRetrievalError(
            f"--index-type {factory!r}: the on-disk type needs an inverted file (IVF...), "
            "e.g. 'ondisk:IVF1024,PQ32x8'; or give 'ondisk' alone"
        )
