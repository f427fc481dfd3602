"""The large-collection index type: IVF-PQ trained on a sample, its inverted lists built shard by
shard and merged on disk (FAISS ``OnDiskInvertedLists``), memory-mapped at search time, its
candidates re-ranked exactly from the stored vectors (:class:`~mocoretrieval.rerank.RerankedIndex`).

Requested as ``ondisk`` (factory chosen here) or ``ondisk:FACTORY`` (any IVF factory, e.g.
``ondisk:OPQ32,IVF1024,PQ32x8``); chosen by ``auto`` past :func:`wants_ondisk`. The index
file holds the quantizers and the name of a ``lists-*.ivfdata`` file in the same folder, which
holds the codes. FAISS recipe: ``faiss/contrib/ondisk.py`` and the wiki's "Indexes that do not
fit in RAM".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import ann
from .errors import IndexFormatError, MoCoRetrievalError
from .ondisk_plan import inner

# Training sample cap: k-means and PQ codebooks converge on a few hundred thousand points
# (FAISS wiki, "Guidelines": 30-256 x nlist); more only lengthens the build.
TRAIN_CAP = 262_144
# Vectors per shard: a shard's codes and ids (1M x (32 + 8) bytes = 40 MB at 256-d) are the
# only part of the index held in RAM while filling.
SHARD_VECTORS = 1_000_000
# Read by FAISS when it loads the index: never write the lists, and look for the .ivfdata file
# next to the index file (a moved index folder still loads). The lists are memory-mapped by
# OnDiskInvertedLists whatever the flags; IO_FLAG_MMAP on index.faiss itself (quantizers only)
# crashed searches in faiss 1.15 (segfault), so it is not set.
LOAD_FLAGS = ("IO_FLAG_READ_ONLY", "IO_FLAG_ONDISK_SAME_DIR")


def build(
    source: ann.VectorSource,
    factory: str,
    lists_path: Path,
    lookup: Any,
    *,
    seed: int = 0,
    tune: bool = True,
    trained: ann.BuiltIndex | None = None,
    shard_vectors: int = SHARD_VECTORS,
    work_dir: Path | None = None,
) -> ann.BuiltIndex:
    """Trains (or reuses the training of) an ``ondisk:FACTORY`` index, fills it shard by shard
    and merges the shards' lists into ``lists_path``; returns it wrapped for exact re-ranking.

    Peak memory: the training sample, one chunk of ``source``, one shard's codes and the
    tuning queries; the merged codes live in ``lists_path`` (memory-mapped).

    Args:
        source: the ids and L2-normalised vectors, read in chunks (several passes).
        factory: ``ondisk:FACTORY`` (see :func:`mocoretrieval.ondisk_plan.resolve`).
        lists_path: the ``.ivfdata`` file to create; it must not exist.
        lookup: the stored vectors by id, for re-ranking (see :mod:`mocoretrieval.rerank`).
        seed: for the training and tuning samples.
        tune: tune nprobe and the re-ranking depth for :data:`ann.TARGET_RECALL`.
        trained: an earlier build of the same factory whose quantizers are kept (no k-means).
        shard_vectors: vectors per shard file.
        work_dir: where the shard files go (removed after the merge); beside ``lists_path``
            by default, so they use the same disk.
    """
    from faiss.contrib.ondisk import merge_ondisk

    from .rerank import RerankedIndex

    faiss = ann.faiss_module()
    t0 = time.perf_counter()
    n = source.n
    trained_on = trained.trained_on if trained is not None else n
    try:
        if trained is not None:
            empty = emptied(trained.index)
        else:
            empty = _trained(source, inner(factory), seed)
        shards_dir = Path(tempfile.mkdtemp(prefix=".shards-", dir=work_dir or lists_path.parent))
        try:
            shard_files = _fill_shards(source, empty, shards_dir, shard_vectors)
            index = faiss.clone_index(empty)
            with _c_stdout_to_stderr():
                merge_ondisk(index, [str(f) for f in shard_files], str(lists_path))
        finally:
            shutil.rmtree(shards_dir, ignore_errors=True)
    except RuntimeError as e:
        raise MoCoRetrievalError(
            f"FAISS could not build {factory!r} over {n} vectors ({ann._first_line(e)}); an IVF "
            "index needs at least as many vectors as lists: use fewer lists or 'ondisk'"
        ) from e
    if index.ntotal != n:
        raise MoCoRetrievalError(f"{n} vectors were announced and {index.ntotal} read; build again")
    _sync(lists_path)
    reranked = RerankedIndex(index, lookup)
    built = ann.BuiltIndex(index=reranked, factory=factory, trained_on=trained_on)
    if tune:
        built.params, built.recall = ann.tune_search(reranked, source, seed=seed)
    else:
        built.params = {**reranked.fixed_options()[0], "nprobe": 16}
        ann.set_params(reranked, built.params)
    built.seconds = time.perf_counter() - t0
    return built


def _trained(source: ann.VectorSource, factory: str, seed: int) -> Any:
    """An empty index of ``factory`` trained on a sample of at most :data:`TRAIN_CAP` vectors."""
    faiss = ann.faiss_module()
    index = faiss.index_factory(source.dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    n_train = min(source.n, TRAIN_CAP, max(ann.TRAIN_PER_LIST * ivf.nlist, 256 * 39))
    rng = np.random.default_rng(seed)
    rows = (
        np.arange(source.n)
        if n_train == source.n
        else np.sort(rng.choice(source.n, n_train, False))
    )
    index.train(ann._gather(source, rows)[1])
    return index


def _fill_shards(source: ann.VectorSource, empty: Any, folder: Path, size: int) -> list[Path]:
    """Adds the vectors of ``source`` to copies of ``empty``, ``size`` at a time, each written
    to ``folder/shard-NNNN.index`` and dropped: one shard's codes in RAM at a time."""
    faiss = ann.faiss_module()
    files: list[Path] = []
    shard = None

    def flush() -> None:
        files.append(folder / f"shard-{len(files):04d}.index")
        faiss.write_index(shard, str(files[-1]))

    for ids, vectors in source.chunks():
        if shard is None:
            shard = faiss.clone_index(empty)
        shard.add_with_ids(vectors, ids)
        if shard.ntotal >= size:
            flush()
            shard = None
    if shard is not None or not files:
        shard = shard if shard is not None else faiss.clone_index(empty)
        flush()
    return files


def emptied(index: Any) -> Any:
    """A trained, empty, in-RAM copy of an on-disk ``index`` (its lists dropped, not read)."""
    faiss = ann.faiss_module()
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = 0
    index.ntotal = 0
    return faiss.clone_index(index)


def lists_file(index: Any) -> str:
    """The base name of the ``.ivfdata`` file an on-disk index reads."""
    faiss = ann.faiss_module()
    invlists = faiss.extract_index_ivf(index).invlists
    return os.path.basename(faiss.downcast_InvertedLists(invlists).filename)


def load(path: Path) -> Any:
    """Reads an on-disk index whose lists file sits in the same folder (wherever the folder has
    moved to), codes memory-mapped; raises :class:`IndexFormatError` when it cannot."""
    faiss = ann.faiss_module()
    flags = 0
    for name in LOAD_FLAGS:
        flags |= getattr(faiss, name)
    try:
        with _c_stdout_to_stderr():
            return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise IndexFormatError(f"cannot read FAISS index {path}: {ann._first_line(e)}") from e


@contextlib.contextmanager
def _c_stdout_to_stderr():
    """Sends what C code prints meanwhile to stderr: FAISS's on-disk lists print progress
    ("resizing ...", "updating ondisk filename ...") on the C stdout, which carries a CLI's
    results (``search --json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C's buffered stdout, before fd 1 is the real one again
        os.dup2(saved, 1)
        os.close(saved)


def _sync(path: Path) -> None:
    """Flushes a file FAISS wrote to disk before anything points at it."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_stale_lists(folder: Path, keep: str | None) -> None:
    """Deletes the ``lists-*.ivfdata`` files of ``folder`` other than ``keep``: the previous
    build's, once the manifest no longer names it, and any a crash left behind (with its
    ``.shards-*`` folder). Called by the writer, which holds the index lock. A process still
    searching a deleted lists file keeps its mapping (POSIX)."""
    for stale in folder.glob("lists-*.ivfdata"):
        if stale.name != keep:
            with contextlib.suppress(OSError):
                stale.unlink()
    for shards in folder.glob(".shards-*"):  # a build that died while filling
        shutil.rmtree(shards, ignore_errors=True)
