"""Issue 13, defect 17: memory at scale. The decode is bounded by bytes as well as pixels, the
database gives back the space of many deletions, and the FAISS build streams the stored vectors
chunk by chunk instead of holding them all."""

from __future__ import annotations

import sqlite3
import tracemalloc

import numpy as np
import pytest
from factories import make_images
from PIL import Image

from mocoretrieval import ann, data, faiss_file
from mocoretrieval.errors import ImageError
from mocoretrieval.faiss_file import FaissFile
from mocoretrieval.index import ImageIndex
from mocoretrieval.store import FileStat, Store


def _store_of(path, n: int, dim: int) -> Store:
    """A store of ``n`` random unit vectors, committed in batches."""
    rng = np.random.default_rng(0)
    store = Store(path, dim)
    for start in range(0, n, 2000):
        x = rng.standard_normal((min(2000, n - start), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        names = [f"{i}.jpg" for i in range(start, start + len(x))]
        store.add_batch(names, x, [FileStat(1, 1)] * len(x))
    return store


def test_the_decode_is_bounded_by_bytes_not_only_pixels(tmp_path, monkeypatch):
    """Fails without the fix: a 32-bit float image was decoded whatever its bytes."""
    monkeypatch.setattr(data, "MAX_DECODE_BYTES", 100_000, raising=False)
    Image.fromarray(np.zeros((200, 200), np.float32), "F").save(tmp_path / "deep.tif")
    Image.new("L", (200, 200)).save(tmp_path / "grey.png")  # 40 kB decoded: fine
    with pytest.raises(ImageError, match="too large to decode"):
        data.load_image(tmp_path / "deep.tif")
    assert data.load_image(tmp_path / "grey.png").size == (200, 200)


def test_many_deletions_give_the_space_back(tmp_path, two_models):
    """Fails without the fix: the freed pages stayed in the database file for good."""
    root = tmp_path / "photos"
    paths = make_images(root, 24, size=(96, 96))
    index = ImageIndex.build(root, model=two_models[0], workers=0)
    for p in paths[4:]:
        p.unlink()
    assert len(index.update(workers=0).removed) == 20
    db = sqlite3.connect(index.store.path)
    free, total = (
        db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_count")
    )
    assert free / total <= 0.25, (free, total)
    assert len(index) == 4


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_the_faiss_build_never_holds_all_vectors(tmp_path, monkeypatch, factory):
    """Fails without the fix: the rebuild read every vector into one array (peak = all of them)."""
    n, dim = 40_000, 64  # 10 MB of vectors, read 500 rows (128 kB) at a time
    store = _store_of(tmp_path / "index.db", n, dim)
    monkeypatch.setattr(faiss_file, "CHUNK_BYTES", 500 * 4 * dim, raising=False)
    manifest = {"index_type": factory, "faiss": None}
    file = FaissFile(tmp_path, store, manifest, lambda: None)
    ann.faiss_module()  # its first import alone allocates megabytes
    tracemalloc.start()
    try:
        file.refresh(save=False, load=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert file.index.ntotal == n
    assert peak < n * dim * 4 / 4, f"peak {peak} bytes for {n * dim * 4} bytes of vectors"


def test_a_streamed_build_finds_what_a_build_in_memory_finds(tmp_path):
    """Equivalence: chunks of 300 rows give the index, tuning and results of one array."""
    store = _store_of(tmp_path / "index.db", 6000, 32)
    ids, vectors = store.all_vectors()
    whole = ann.build(ids, vectors, "IVF16,Flat")
    sizes = []
    with store.snapshot_chunks(chunk=300) as snapshot:
        chunks = snapshot.chunks

        def spied():
            for ids_chunk, vectors_chunk in chunks():
                sizes.append(len(ids_chunk))
                yield ids_chunk, vectors_chunk

        snapshot.chunks = spied
        streamed = ann.build_from(snapshot, "IVF16,Flat")
    assert max(sizes) == 300 and streamed.params == whole.params
    assert streamed.recall == whole.recall and streamed.trained_on == whole.trained_on
    queries = vectors[::97]
    for a, b in zip(whole.index.search(queries, 10), streamed.index.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_every_pass_over_a_chunked_snapshot_reads_one_state(tmp_path):
    """Defect 6 kept: a commit between two chunks (or two passes) changes nothing read."""
    store = _store_of(tmp_path / "index.db", 10, 4)
    with store.snapshot_chunks(chunk=3) as snapshot:
        first = snapshot.chunks()
        head = next(first)
        store.add_batch(["new.jpg"], np.eye(4, dtype=np.float32)[:1], [FileStat(1, 1)])
        store.remove(["0.jpg"])
        rest = list(first)
        again = list(snapshot.chunks())
    read = np.concatenate([head[0], *(c[0] for c in rest)])
    assert read.tolist() == np.concatenate([c[0] for c in again]).tolist() == list(range(1, 11))
    assert snapshot.n == 10 and snapshot.generation < store.generation
    assert len(store.all_vectors()[0]) == 10  # the next snapshot sees both commits
