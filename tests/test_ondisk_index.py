"""The large-collection (on-disk IVF-PQ) index type, forced on a few thousand vectors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mocoretrieval import ann, ondisk, ondisk_plan
from mocoretrieval.faiss_file import FaissFile
from mocoretrieval.rerank import RerankedIndex
from mocoretrieval.store import FileStat, Store

DIM, N = 64, 2000
# 4-bit codes: 16 centroids per sub-quantizer train in a second, 256 (x8) take tens here.
FORCED = "ondisk:IVF16,PQ8x4"


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, DIM)).astype(np.float32)
    v = centres[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _array_lookup(ids: np.ndarray, vectors: np.ndarray):
    def lookup(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.unique(wanted[wanted >= 0])
        return found, vectors[np.searchsorted(ids, found)]

    return lookup


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def _add(store: Store, vectors: np.ndarray, first: int) -> None:
    for start in range(0, len(vectors), 500):
        names = [f"{first + i}.jpg" for i in range(start, start + 500)]
        store.add_batch(names, vectors[start : start + 500], [FileStat(1, 1)] * len(names))


def _recall(index, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> float:
    truth = ids[_exact(vectors, queries, 10)]
    _, found = index.search(queries, 10)
    return np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])


def _faiss_file(folder, store, manifest) -> FaissFile:
    return FaissFile(folder, store, manifest, lambda: None)


@pytest.fixture
def indexed(tmp_path):
    """A store of N clustered vectors (ids 1..N) and its FaissFile, forced on disk and saved."""
    vectors = _clustered(N)
    (tmp_path / "idx").mkdir()
    store = Store(tmp_path / "idx" / "index.db", DIM)
    _add(store, vectors, 0)
    manifest = {"index_type": FORCED}
    ff = _faiss_file(tmp_path / "idx", store, manifest)
    ff.refresh(save=True, load=True)
    yield store, ff, manifest, vectors
    store.close()


def test_shard_merged_lists_equal_an_in_ram_ivfpq_of_the_same_training(tmp_path):
    """Same trained quantizers, lists filled in three shards and merged on disk vs one in-RAM
    add: identical candidates and distances. Catches a shard left out of the merge (mutation run:
    merging ``shard_files[1:]``), or ids shifted while filling (``add`` for ``add_with_ids``)."""
    faiss = ann.faiss_module()
    vectors = _clustered(N)
    ids = np.arange(N, dtype=np.int64) * 7 + 3  # not positions: the ids must survive
    source = ann.ArraySource(ids, vectors, chunk=400)
    built = ondisk.build(
        source,
        FORCED,
        tmp_path / "lists-a.ivfdata",
        _array_lookup(ids, vectors),
        shard_vectors=700,
        tune=False,
    )
    assert isinstance(built.index, RerankedIndex) and built.index.ntotal == N
    faiss.write_index(built.index.base, str(tmp_path / "a.index"))
    trained = ondisk.emptied(ondisk.load(tmp_path / "a.index"))
    in_ram = faiss.clone_index(trained)
    in_ram.add_with_ids(vectors, ids)
    ann.set_params(built.index, {"nprobe": 8})
    faiss.ParameterSpace().set_index_parameter(in_ram, "nprobe", 8)
    d1, i1 = built.index.base.search(vectors[:200], 20)
    d2, i2 = in_ram.search(vectors[:200], 20)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_reranking_scores_are_exact_and_recall_reaches_the_target(indexed):
    """The returned scores are the exact inner products of the stored vectors, and the tuned
    recall@10 against exact search is over 0.9 on new queries. Catches a wrapper that returns
    the PQ distances (no re-ranking) or mixes up candidates and their queries (mutation run: the
    einsum against the queries reversed)."""
    _, ff, manifest, vectors = indexed
    index = ff.get()
    assert isinstance(index, RerankedIndex)
    assert set(manifest["faiss"]["params"]) == {"nprobe", "k_factor"}
    noise = 0.1 * np.random.default_rng(5).standard_normal((100, DIM)).astype(np.float32)
    queries = vectors[::20] + noise  # near the collection, not in it
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert manifest["faiss"]["recall_at_10"] >= ann.TARGET_RECALL
    scores, found = index.search(queries, 10)
    exact = np.einsum("qkd,qd->qk", vectors[found - 1], queries)  # store ids start at 1
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)
    assert _recall(index, vectors, np.arange(1, N + 1), queries) >= 0.9


def test_search_after_reopening_maps_the_saved_lists_without_rebuilding(indexed, monkeypatch):
    """A new reader loads index.faiss + the .ivfdata it names (memory-mapped) and finds the
    same results. Catches a freshness check or load path that rebuilds every time, or a load
    that does not find the lists (mutation run: ``_fresh`` comparing the lists' size with ``!=``)."""
    store, ff, manifest, vectors = indexed
    entry = manifest["faiss"]
    assert (ff.dir / entry["lists"]).stat().st_size == entry["lists_bytes"] > 0
    want = ff.get().search(vectors[:50], 10)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt instead of loaded")

    monkeypatch.setattr(ondisk, "build", no_rebuild)
    reader = _faiss_file(ff.dir, store, dict(manifest))
    got = reader.get().search(vectors[:50], 10)
    np.testing.assert_array_equal(got[1], want[1])


def test_a_moved_index_folder_still_loads(indexed, tmp_path, monkeypatch):
    """The index file names its lists by base name, looked up beside it: copy the folder away,
    delete the original, and the copy still searches. Catches loading without
    IO_FLAG_ONDISK_SAME_DIR (mutation run: FAISS then opens the old absolute path)."""
    store, ff, manifest, vectors = indexed
    want = ff.get().search(vectors[:20], 10)[1]
    store.close()
    moved = tmp_path / "moved"
    shutil.copytree(ff.dir, moved)
    shutil.rmtree(ff.dir)
    monkeypatch.setattr(ondisk, "build", lambda *a, **k: pytest.fail("rebuilt"))
    copy = Store(moved / "index.db", DIM)
    got = _faiss_file(moved, copy, dict(manifest)).get().search(vectors[:20], 10)[1]
    copy.close()
    np.testing.assert_array_equal(got, want)


def test_a_crash_between_the_lists_and_the_index_file_keeps_the_old_index(indexed, monkeypatch):
    """Rebuild, and die while index.faiss is being replaced (the new .ivfdata is written): the
    old index.faiss, its lists and the manifest still load and search; the next good build
    removes the stray lists and shard folders. Catches deleting the old lists before the manifest names the new
    ones (mutation run: ``remove_stale_lists`` before ``ann.save``), or new lists written over
    the old file."""
    store, ff, manifest, vectors = indexed
    old = dict(manifest["faiss"])
    want = ff.get().search(vectors[:20], 10)[1]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ann, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ff._rebuild(save=True)
    assert manifest["faiss"] == old
    assert len(list(ff.dir.glob("lists-*.ivfdata"))) == 2  # the stray one is left, like a crash
    monkeypatch.setattr(ondisk, "build", lambda *a, **k: pytest.fail("rebuilt"))
    reader = _faiss_file(ff.dir, store, dict(manifest))
    np.testing.assert_array_equal(reader.get().search(vectors[:20], 10)[1], want)
    monkeypatch.undo()
    (ff.dir / ".shards-died").mkdir()  # as a build killed while filling leaves
    ff._rebuild(save=True)
    assert [p.name for p in ff.dir.glob("lists-*.ivfdata")] == [manifest["faiss"]["lists"]]
    assert not list(ff.dir.glob(".shards-*"))


def test_adding_and_removing_files_refills_the_lists_with_the_same_training(indexed):
    """Remove 300 vectors and add 300 new ones: the index holds exactly the store's vectors,
    a removed one is never returned, each new one finds itself, and k-means is not redone.
    Catches a refill over a template that is not emptied (mutation run: ``emptied`` without
    resetting ``ntotal``) or one that drops the update."""
    store, ff, manifest, vectors = indexed
    trained_on = manifest["faiss"]["trained_on"]
    index, fresh = _swap_300(store, ff)
    assert manifest["faiss"]["trained_on"] == trained_on
    _, found = index.search(np.concatenate([vectors[:300], fresh]), 10)
    assert not set(found.ravel().tolist()) & set(range(1, 301))
    new_ids = store.vectors_of(np.arange(N + 1, N + 301))[0]
    assert (found[300:, 0] == new_ids).mean() >= 0.98


def test_the_default_recipe_rotates_and_refills_through_the_rotation(tmp_path):
    """``ondisk`` at 2,000 x 64-d builds the default recipe, an OPQ rotation before the IVF-PQ
    (an IndexPreTransform around the lists): its tuned recall reaches the target, new queries
    find their exact neighbours, and a refill after adding and removing files keeps the
    rotation and holds exactly the store's vectors. Catches a refill that empties only the
    inner IVF of the wrapper (mutation run: ``emptied`` without ``index.ntotal = 0``: FAISS's
    merge refuses the template, "works only on empty index")."""
    vectors = _clustered(N)
    (tmp_path / "idx").mkdir()
    store = Store(tmp_path / "idx" / "index.db", DIM)
    _add(store, vectors, 0)
    manifest = {"index_type": "ondisk"}
    ff = _faiss_file(tmp_path / "idx", store, manifest)
    ff.refresh(save=True, load=True)
    assert manifest["faiss"]["factory"] == ondisk_plan.factory_for(N, DIM)
    assert manifest["faiss"]["factory"] == "ondisk:OPQ8,IVF89,PQ8x8"
    assert manifest["faiss"]["recall_at_10"] >= ann.TARGET_RECALL
    noise = 0.1 * np.random.default_rng(5).standard_normal((100, DIM)).astype(np.float32)
    queries = vectors[::20] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert _recall(ff.get(), vectors, np.arange(1, N + 1), queries) >= 0.9

    index, fresh = _swap_300(store, ff)
    assert manifest["faiss"]["trained_on"] == N  # the rotation and codebooks were kept
    _, found = index.search(fresh, 10)
    new_ids = store.vectors_of(np.arange(N + 1, N + 301))[0]
    assert (found[:, 0] == new_ids).mean() >= 0.98
    store.close()


def _swap_300(store: Store, ff: FaissFile):
    """Removes the first 300 files, adds 300 new vectors, refreshes the index: (index, new
    vectors), after checking that it holds exactly the store's vectors."""
    store.remove([f"{i}.jpg" for i in range(300)])
    fresh = _clustered(500, seed=9)[:300]
    _add_some(store, fresh)
    ff.refresh(save=True, load=True)
    index = ff.get()
    assert index.ntotal == store.count() == N
    return index, fresh


def _add_some(store: Store, vectors: np.ndarray) -> None:
    names = [f"new{i}.jpg" for i in range(len(vectors))]
    store.add_batch(names, vectors, [FileStat(1, 1)] * len(names))


def test_auto_picks_the_ondisk_type_past_the_threshold(monkeypatch, tmp_path):
    """With the threshold patched down to 1,500, ``auto`` stays in RAM below it, goes on disk
    above it (and past the RAM budget), and a FaissFile with ``auto`` then writes lists.
    Catches a threshold that is not consulted or compared the wrong way (mutation run: ``>``
    for ``>=`` in ``wants_ondisk``)."""
    monkeypatch.setattr(ann, "EXACT_MAX", 100)
    monkeypatch.setattr(ondisk_plan, "MIN_VECTORS", 1500)
    assert not ann.auto_factory(1499, DIM).startswith("ondisk")
    assert ann.auto_factory(1500, 256) == "ondisk:OPQ32,IVF77,PQ32x8"
    monkeypatch.setattr(ondisk_plan, "RAM_BUDGET", 1400 * DIM * 4)
    assert ann.auto_factory(1450, DIM).startswith("ondisk:")
    assert ondisk_plan.factory_for(10_000_000, 2048) == "ondisk:IVF6325,PQ64x8"  # no OPQ
    monkeypatch.setattr(ondisk_plan, "factory_for", lambda n, dim: FORCED)  # fast to train here
    store = Store(tmp_path / "index.db", DIM)
    _add(store, _clustered(N), 0)
    manifest = {"index_type": "auto"}
    _faiss_file(tmp_path, store, manifest).refresh(save=True)
    assert manifest["faiss"]["factory"] == FORCED and manifest["faiss"]["lists"]
    store.close()


def test_forcing_checks_the_factory():
    """``ondisk:`` needs an IVF factory; a bad one is refused before any work. Catches the
    IVF check left out (mutation run: ``if False`` for it)."""
    ann.check_factory("ondisk", DIM)
    ann.check_factory(FORCED, DIM)
    with pytest.raises(Exception, match="inverted file"):
        ann.check_factory("ondisk:PQ8", DIM)
    with pytest.raises(Exception, match="needs at least as many"):
        ann.check_buildable("ondisk:IVF4096,PQ8x4", 100, DIM)


def test_an_image_folder_indexed_with_the_forced_type_finds_each_image(
    image_folder, tiny_encoder_dir, tmp_path
):
    """End to end through ``ImageIndex`` with ``index_type="ondisk"`` on 18 images: lists
    file beside index.faiss, every image its own top hit with score ~1, and a reopened index
    (another process's view) finds the same. Catches the forced type not reaching the build
    (mutation run: ``FaissFile`` never taking the on-disk branch)."""
    from mocoretrieval.index import ImageIndex

    index = ImageIndex.build(
        image_folder, tiny_encoder_dir, tmp_path / "idx", workers=0, index_type="ondisk"
    )
    images = sorted(p for p in image_folder.rglob("*") if p.suffix in (".jpg", ".png"))
    # k=6 with k_factor >= 4: 24 candidates, the whole collection, so the re-ranking is exact.
    for hits, image in zip(index.search_batch(images, k=6), images):
        assert hits[0].path == str(image) and hits[0].score > 0.999
    assert len(list((tmp_path / "idx").glob("lists-*.ivfdata"))) == 1
    assert index.info()["index_type"].startswith("ondisk:IVF8,PQ")  # 2 x sqrt(18) lists
    assert index.info()["index_type"].endswith("x2")  # 2-bit codes: 18 images train 4 centroids
    index.close()
    again = ImageIndex.open(tmp_path / "idx")
    assert again.search(images[3], k=6)[0].path == str(images[3])
    again.close()


def test_faiss_progress_prints_stay_off_stdout(tmp_path, capfd):
    """FAISS prints "resizing ..." and "updating ondisk filename ..." from C; they go to stderr
    so a CLI's stdout (``search --json``) stays parseable. Catches the redirection left out
    (mutation run: ``merge_ondisk`` and ``read_index`` outside ``_c_stdout_to_stderr``)."""
    import ctypes

    vectors = _clustered(500)
    ids = np.arange(500, dtype=np.int64)
    built = ondisk.build(
        ann.ArraySource(ids, vectors),
        "ondisk:IVF4,PQ8x4",
        tmp_path / "lists-a.ivfdata",
        _array_lookup(ids, vectors),
        tune=False,
    )
    ann.save(built.index.base, tmp_path / "index.faiss")
    ondisk.load(tmp_path / "index.faiss")
    ctypes.CDLL(None).fflush(None)
    out, err = capfd.readouterr()
    assert out == "" and "resizing" in err


def test_a_single_query_scans_its_lists_on_every_thread(indexed):
    """One query splits its probed lists between threads (parallel_mode 1), a batch splits
    the queries (mode 0); both return the same results. Breaking it: without the switch, the
    mode stays 0 for a single query: checked, it fails."""
    import faiss

    _, ff, _, vectors = indexed
    index = ff.get()
    ivf = faiss.extract_index_ivf(index.base)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        one = [index.search(q[None], 10) for q in vectors[:8]]
        assert ivf.parallel_mode == 1
        scores, ids = index.search(vectors[:8], 10)
        assert ivf.parallel_mode == 0
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(np.concatenate([i for _, i in one]), ids)
    np.testing.assert_allclose(np.concatenate([s for s, _ in one]), scores, rtol=1e-6)
