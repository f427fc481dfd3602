"""Issue 15, storage that scales: a float16 store halves the vectors' bytes, reads float32 back,
records its dtype for later runs, and every FAISS build streams the store in chunks."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing

import numpy as np
import pytest
from factories import make_images

from mocoretrieval import faiss_file
from mocoretrieval.cli import main
from mocoretrieval.errors import IndexFormatError, MoCoRetrievalError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import FAISS_FILE
from mocoretrieval.store import FileStat, Store

DIM = 256


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _filled(path, dtype: str | None, n: int = 200) -> tuple[Store, np.ndarray]:
    store = Store(path, DIM, dtype=dtype)
    vectors = _vectors(n)
    for start in range(0, n, 50):
        batch = vectors[start : start + 50]
        names = [f"{i}.jpg" for i in range(start, start + len(batch))]
        store.add_batch(names, batch, [FileStat(1, 1)] * len(batch))
    return store, vectors


def _blob_bytes(store: Store) -> int:
    with closing(sqlite3.connect(store.path)) as db:
        return db.execute("SELECT SUM(LENGTH(vector)) FROM vectors").fetchone()[0]


def test_a_float16_store_halves_the_vector_bytes(tmp_path):
    """Catches a float16 store that still writes 4-byte floats (encode ignoring the dtype)."""
    wide, _ = _filled(tmp_path / "f32.db", None)
    narrow, _ = _filled(tmp_path / "f16.db", "float16")
    assert wide.dtype == "float32" and narrow.dtype == "float16"
    assert _blob_bytes(wide) == 200 * DIM * 4
    assert _blob_bytes(narrow) == 200 * DIM * 2
    for store in (wide, narrow):
        store.close()  # the last connection checkpoints the WAL into the database file
    assert narrow.path.stat().st_size <= 0.6 * wide.path.stat().st_size


def test_every_reader_gets_float32_back_from_a_float16_store(tmp_path):
    """Catches a decode that ignores the store dtype (reading 2-byte values as 4-byte ones
    raises "another dimension") or hands float16 arrays to FAISS and the app."""
    store, vectors = _filled(tmp_path / "f16.db", "float16", n=120)
    expected = vectors.astype(np.float16).astype(np.float32)
    _, read = store.all_vectors()
    assert read.dtype == np.float32 and read.shape == (120, DIM)
    np.testing.assert_array_equal(read, expected)
    np.testing.assert_allclose(read, vectors, atol=1e-3)
    chunks = list(store.iter_vectors(batch=50))
    np.testing.assert_array_equal(np.concatenate([v for _, v in chunks]), expected)
    with store.snapshot_chunks(chunk=70) as snapshot:
        assert snapshot.dtype == "float16"
        streamed = list(snapshot.chunks())
    assert all(v.dtype == np.float32 for _, v in streamed)
    np.testing.assert_array_equal(np.concatenate([v for _, v in streamed]), expected)
    assert store.vector("7.jpg").dtype == np.float32
    np.testing.assert_array_equal(store.vector("7.jpg"), expected[7])


def test_the_dtype_is_recorded_and_reused(tmp_path):
    """Catches a dtype that is not recorded at creation (a reopened store would read float16
    rows as float32) and a second, different dtype that is silently ignored."""
    store, _ = _filled(tmp_path / "f16.db", "float16", n=10)
    store.close()
    again = Store(tmp_path / "f16.db", DIM)
    assert again.dtype == "float16"
    again.add_batch(["new.jpg"], _vectors(1, seed=5), [FileStat(1, 1)])
    assert _blob_bytes(again) == 11 * DIM * 2
    np.testing.assert_allclose(again.vector("new.jpg"), _vectors(1, seed=5)[0], atol=1e-3)
    again.close()
    reader = Store(tmp_path / "f16.db", DIM, readonly=True)
    assert reader.dtype == "float16" and len(reader.all_vectors()[0]) == 11
    reader.close()
    with pytest.raises(MoCoRetrievalError, match="stores float16 vectors, not float32.*rebuild"):
        Store(tmp_path / "f16.db", DIM, dtype="float32")


def test_a_store_from_before_float16_reads_as_float32_and_older_releases_refuse_float16(
    tmp_path,
):
    """Catches a missing default (a store without the meta entry) and a float16 store left at
    schema version 1, which a release without float16 would misread as another dimension."""
    old, vectors = _filled(tmp_path / "old.db", None, n=5)
    old.close()
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("DELETE FROM meta WHERE key='vector_dtype'")  # as written before float16
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    reopened = Store(tmp_path / "old.db", DIM)
    assert reopened.dtype == "float32"
    np.testing.assert_array_equal(reopened.all_vectors()[1], vectors)
    reopened.close()
    _filled(tmp_path / "f16.db", "float16", n=1)[0].close()
    with sqlite3.connect(tmp_path / "f16.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    with pytest.raises(MoCoRetrievalError, match="float64"):
        Store(tmp_path / "x.db", DIM, dtype="float64")
    with sqlite3.connect(tmp_path / "f16.db") as db:
        db.execute("UPDATE meta SET value='bfloat16' WHERE key='vector_dtype'")
    with pytest.raises(IndexFormatError, match="upgrade"):
        Store(tmp_path / "f16.db", DIM)


def test_clear_switches_the_dtype_in_its_transaction(tmp_path):
    """Catches a ``clear(dtype)`` that forgets the new dtype or its schema version."""
    store, _ = _filled(tmp_path / "s.db", None, n=4)
    store.clear("float16")
    assert store.dtype == "float16" and store.count() == 0
    store.add_batch(["a.jpg"], _vectors(1), [FileStat(1, 1)])
    assert _blob_bytes(store) == DIM * 2
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    store.clear("float32")
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder (with an exact copy) indexed twice, float32 and float16, by one encoder."""
    import torch
    from factories import make_tiny_encoder

    tmp = tmp_path_factory.mktemp("dtype")
    torch.manual_seed(0)
    make_tiny_encoder().save_pretrained(tmp / "encoder")
    root = tmp / "photos"
    make_images(root, 8)
    make_images(root / "sub", 4, seed=1)
    shutil.copy(root / "img_0003.png", root / "sub" / "copy.png")
    wide = ImageIndex.build(root, tmp / "encoder", tmp / "f32", workers=0)
    narrow = ImageIndex.build(root, tmp / "encoder", tmp / "f16", workers=0, store_dtype="float16")
    yield root, tmp, wide, narrow
    wide.close()
    narrow.close()


def test_a_float16_index_finds_what_a_float32_one_finds(folders):
    """Equivalence on a generated folder: same top-1 for every image, scores within 1e-3.
    Catches a float16 store whose vectors are misdecoded (e.g. as the wrong dtype's bytes)."""
    root, _, wide, narrow = folders
    assert wide.info()["store_dtype"] == "float32" and narrow.info()["store_dtype"] == "float16"
    images = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
    for a, b in zip(wide.search_batch(images, k=5), narrow.search_batch(images, k=5)):
        assert a[0].path == b[0].path
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-3)
    pairs = [sorted(r.path for r in g) for g in narrow.duplicates()]
    assert pairs == [sorted(r.path for r in g) for g in wide.duplicates()]
    copies = {str(root / "img_0003.png"), str(root / "sub" / "copy.png")}
    assert any(copies <= set(group) for group in pairs)


def test_another_dtype_on_an_existing_index_needs_a_rebuild(folders):
    """Catches an explicit ``--store-dtype`` that is silently ignored on an existing index, or a
    rebuild that re-embeds without switching the store."""
    root, tmp, _, _ = folders
    target = tmp / "switch"
    ImageIndex.build(root, tmp / "encoder", target, workers=0, store_dtype="float16").close()
    with pytest.raises(MoCoRetrievalError, match="float16.*--rebuild --store-dtype float32"):
        ImageIndex.create(root, index_dir=target, store_dtype="float32")
    kept = ImageIndex.build(root, index_dir=target, workers=0)  # no dtype: the recorded one
    assert kept.store.dtype == "float16" and not kept.last_report.added
    kept.close()
    rebuilt = ImageIndex.build(
        root, index_dir=target, rebuild=True, workers=0, store_dtype="float32"
    )
    assert rebuilt.store.dtype == "float32" and len(rebuilt.last_report.added) == len(rebuilt)
    assert _blob_bytes(rebuilt.store) == len(rebuilt) * rebuilt.dim * 4
    rebuilt.close()


def test_the_cli_records_the_dtype_and_explains_a_change(folders, tmp_path, capsys):
    """Catches ``--store-dtype`` not reaching the index (wiring) or a raw traceback on a change."""
    root, tmp, _, _ = folders
    target = tmp_path / "cli"
    base = ["index", str(root), "--index", str(target), "--model", str(tmp / "encoder")]
    base += ["--workers", "0", "-q", "--backend", "torch"]
    assert main([*base, "--store-dtype", "float16"]) == 0
    capsys.readouterr()
    assert main(["info", "--index", str(target)]) == 0
    assert "store_dtype:          float16" in capsys.readouterr().out
    assert main([*base, "--store-dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--rebuild --store-dtype float32" in err


def test_no_build_or_read_path_loads_every_vector_at_once(folders, tmp_path, monkeypatch):
    """Catches any FAISS build, search or duplicates run that falls back to the whole-array
    reads (``all_vectors``/``snapshot``) instead of streaming the store in chunks."""
    root, tmp, _, _ = folders

    def whole(*args, **kwargs):
        raise AssertionError("the whole store was loaded into one array")

    monkeypatch.setattr(Store, "all_vectors", whole)
    monkeypatch.setattr(Store, "snapshot", whole)
    monkeypatch.setattr(faiss_file, "CHUNK_BYTES", 1)  # one row a chunk
    index = ImageIndex.build(
        root,
        tmp / "encoder",
        tmp_path / "ivf",
        workers=0,
        store_dtype="float16",
        index_type="IVF2,Flat",
    )
    assert index.info()["index_type"] == "IVF2,Flat" and index.faiss.index.ntotal == len(index)
    (tmp_path / "ivf" / FAISS_FILE).unlink()  # a reader rebuilds it in memory, streamed too
    reader = ImageIndex.open(tmp_path / "ivf")
    assert reader.search(root / "img_0005.png", k=1)[0].path == str(root / "img_0005.png")
    assert reader.duplicates()
    reader.close()
    index.close()
