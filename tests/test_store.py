"""The SQLite store: batches are atomic, vectors follow their files, newer schemas are refused."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from mocoretrieval.errors import IndexFormatError
from mocoretrieval.store import FileStat, Store

DIM = 8


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "index.db", DIM)
    yield s
    s.close()


def test_batch_round_trip(store):
    vectors = _vectors(3)
    store.add_batch(["a.jpg", "b.jpg", "c.png"], vectors, [FileStat(i, 10 + i) for i in range(3)])
    files = store.files()
    assert sorted(files) == ["a.jpg", "b.jpg", "c.png"]
    assert (files["b.jpg"].size, files["b.jpg"].mtime_ns) == (1, 11)
    ids, stored = store.all_vectors()
    assert len(set(ids.tolist())) == 3
    by_path = store.paths_of(ids)
    for vid, vec in zip(ids, stored):
        np.testing.assert_array_equal(vec, vectors[["a.jpg", "b.jpg", "c.png"].index(by_path[vid])])
    assert store.count() == 3 and store.generation == 1


def test_replacing_a_file_replaces_its_vector_and_never_reuses_ids(store):
    store.add_batch(["a.jpg"], _vectors(1, 0), [FileStat(1, 1)])
    (old_id,), _ = store.all_vectors()
    store.add_batch(["a.jpg"], _vectors(1, 1), [FileStat(2, 2)])
    ids, vectors = store.all_vectors()
    assert store.count() == 1 and ids[0] != old_id
    np.testing.assert_array_equal(vectors[0], _vectors(1, 1)[0])
    store.remove(["a.jpg"])
    store.add_batch(["b.jpg"], _vectors(1, 2), [FileStat(3, 3)])
    assert store.all_vectors()[0][0] not in (old_id, ids[0])


def test_skipped_file_keeps_its_reason_and_drops_its_old_vector(store):
    store.add_batch(["a.jpg", "b.jpg"], _vectors(2), [FileStat(1, 1), FileStat(2, 2)])
    store.add_batch([], _vectors(0), [], skipped=[("a.jpg", "truncated", FileStat(5, 5))])
    assert store.count() == 1
    assert store.skipped() == {"a.jpg": "truncated"}
    assert store.files()["a.jpg"].vector_id is None
    store.remove(["a.jpg", "b.jpg"])
    assert store.files() == {} and store.count() == 0


def test_a_failing_batch_commits_nothing(store):
    store.add_batch(["a.jpg"], _vectors(1), [FileStat(1, 1)])
    generation = store.generation
    bad_stat = FileStat(object(), 1)  # sqlite cannot bind it: fails mid-transaction
    with pytest.raises(sqlite3.Error):
        store.add_batch(["b.jpg", "c.jpg"], _vectors(2), [FileStat(2, 2), bad_stat])
    assert sorted(store.files()) == ["a.jpg"]
    assert store.count() == 1 and store.generation == generation


def test_wrong_vector_shape_is_refused(store):
    with pytest.raises(ValueError, match="expected"):
        store.add_batch(["a.jpg"], np.zeros((1, DIM + 1), np.float32), [FileStat(1, 1)])


def test_iter_vectors_pages_through_everything(store):
    n = 10
    store.add_batch([f"{i}.jpg" for i in range(n)], _vectors(n), [FileStat(i, i) for i in range(n)])
    chunks = list(store.iter_vectors(batch=3))
    assert [len(ids) for ids, _ in chunks] == [3, 3, 3, 1]
    assert np.concatenate([ids for ids, _ in chunks]).tolist() == store.all_vectors()[0].tolist()


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "index.db", DIM).close()
    with sqlite3.connect(tmp_path / "index.db") as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(IndexFormatError, match="upgrade"):
        Store(tmp_path / "index.db", DIM)


def test_garbage_database_is_a_clear_error(tmp_path):
    (tmp_path / "index.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexFormatError, match="index again|Delete"):
        Store(tmp_path / "index.db", DIM)


def test_readonly_store_reads(tmp_path):
    s = Store(tmp_path / "index.db", DIM)
    s.add_batch(["a.jpg"], _vectors(1), [FileStat(1, 1)])
    s.close()
    ro = Store(tmp_path / "index.db", DIM, readonly=True)
    assert list(ro.files()) == ["a.jpg"] and ro.count() == 1
    ro.close()


# --- thumbnails ---------------------------------------------------------------------------


def _thumb_count(store: Store) -> int:
    return store._db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0]


def test_thumbnails_follow_their_file(store):
    store.add_batch(
        ["a.jpg", "b.jpg", "c.jpg"],
        _vectors(3),
        [FileStat(1, 1), FileStat(2, 2), FileStat(3, 3)],
        thumbnails=[b"A", None, b"C"],
    )
    got = store.thumbnails(["a.jpg", "b.jpg", "c.jpg", "nope.jpg"])
    assert got == {
        "a.jpg": (FileStat(1, 1), b"A"),
        "c.jpg": (FileStat(3, 3), b"C"),
    }
    # Re-embedding without a thumbnail drops the old one; skipping or removing drops it too.
    store.add_batch(["a.jpg"], _vectors(1, 1), [FileStat(4, 4)])
    store.add_batch([], _vectors(0), [], skipped=[("c.jpg", "truncated", FileStat(5, 5))])
    assert store.thumbnails(["a.jpg", "c.jpg"]) == {}
    store.add_batch(["b.jpg"], _vectors(1, 2), [FileStat(6, 6)], thumbnails=[b"B2"])
    assert store.thumbnails(["b.jpg"])["b.jpg"].jpeg == b"B2"
    store.remove(["b.jpg"])
    assert store.thumbnails(["b.jpg"]) == {} and _thumb_count(store) == 0
    store.add_batch(["d.jpg"], _vectors(1, 3), [FileStat(7, 7)], thumbnails=[b"D"])
    store.clear()
    assert _thumb_count(store) == 0


def test_thumbnails_commit_with_their_batch_or_not_at_all(store):
    bad_stat = FileStat(object(), 1)
    with pytest.raises(sqlite3.Error):
        store.add_batch(
            ["a.jpg", "b.jpg"], _vectors(2), [FileStat(1, 1), bad_stat], thumbnails=[b"A", b"B"]
        )
    assert _thumb_count(store) == 0
    with pytest.raises(ValueError, match="thumbnails"):
        store.add_batch(["a.jpg"], _vectors(1), [FileStat(1, 1)], thumbnails=[b"A", b"B"])


def test_a_database_from_before_thumbnails_still_opens(tmp_path):
    path = tmp_path / "index.db"
    s = Store(path, DIM)
    s.add_batch(["a.jpg"], _vectors(1), [FileStat(1, 1)])
    s._db.execute("DROP TABLE thumbnails")  # as an index built before thumbnails has it
    s.close()
    ro = Store(path, DIM, readonly=True)
    assert ro.count() == 1 and ro.thumbnails(["a.jpg"]) == {}
    ro.close()
    rw = Store(path, DIM)  # a writable open adds the table and keeps the rest
    assert rw.count() == 1 and rw.thumbnails(["a.jpg"]) == {}
    rw.add_batch(["b.jpg"], _vectors(1, 1), [FileStat(2, 2)], thumbnails=[b"B"])
    assert rw.thumbnails(["a.jpg", "b.jpg"]) == {"b.jpg": (FileStat(2, 2), b"B")}
    rw.close()
