"""Issue 13, defects 1, 2 and 6: a long-lived reader next to a writer, a writer refused for the
lock, and a snapshot read of the vectors while another process commits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mocoretrieval.errors import IndexBusyError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import UpdateLock
from mocoretrieval.store import FileStat, Store


def _pin(root) -> str:
    manifest = json.loads((root / ".mocoretrieval" / "manifest.json").read_text())
    return manifest["encoder"]["weights_hash"]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_reader_never_reverts_the_pin_and_follows_a_rebuild(indexed, two_models):
    """Defect 1. Fails without the fix: the reader's search rebuilt the FAISS index from the
    new vectors and saved its stale manifest, pinning model A over B's vectors."""
    reader = ImageIndex.open(indexed)  # like `serve`: opened once, searched for hours
    assert reader.search(indexed / "img_0001.png", k=1)[0].path.endswith("img_0001.png")
    writer = ImageIndex.build(indexed, model=two_models[1], rebuild=True, workers=0)
    pin_b = writer.encoder.weights_hash()
    writer.close()
    manifest = indexed / ".mocoretrieval" / "manifest.json"
    before = _digest(manifest)

    hits = reader.search(indexed / "img_0003.png", k=1)  # embedded with B, the new pin
    assert hits[0].path.endswith("img_0003.png") and hits[0].score > 0.999
    assert reader.search(np.ones(reader.dim, np.float32), k=2)
    assert reader.info()["weights_hash"] == pin_b == _pin(indexed)
    assert _digest(manifest) == before  # the reader wrote nothing
    reader.close()


def test_a_refused_rebuild_or_index_type_changes_nothing(indexed, two_models):
    """Defect 2. Fails without the fix: --rebuild cleared the database and re-pinned the
    manifest, and --index-type rewrote it, before update() found the lock taken."""
    idx = indexed / ".mocoretrieval"
    before = {p.name: _digest(p) for p in (idx / "manifest.json", idx / "index.faiss")}
    store = Store(idx / "index.db", 512, readonly=True)
    generation, count = store.generation, store.count()
    with UpdateLock(idx):  # another `mocoretrieval index` is running
        with pytest.raises(IndexBusyError, match="another"):
            ImageIndex.build(indexed, model=two_models[1], rebuild=True, workers=0)
        with pytest.raises(IndexBusyError):
            ImageIndex.build(indexed, index_type="HNSW8,Flat", workers=0)
    assert {p.name: _digest(p) for p in (idx / "manifest.json", idx / "index.faiss")} == before
    assert (store.generation, store.count()) == (generation, count)
    store.close()


def test_all_vectors_is_one_snapshot(tmp_path):
    """Defect 6. Fails without the fix: a commit between the row count and the row read made
    ``all_vectors`` raise ValueError (could not broadcast)."""
    dim = 4
    path = tmp_path / "index.db"
    writer = Store(path, dim)
    writer.add_batch(["a.jpg"], np.eye(dim, dtype=np.float32)[:1], [FileStat(1, 1)])
    reader = Store(path, dim, readonly=True)
    committed = []

    def commit_meanwhile(statement: str) -> None:  # runs inside the reader's query
        if "FROM vectors" in statement and "COUNT" not in statement and not committed:
            committed.append(1)
            vectors = np.eye(dim, dtype=np.float32)[1:3]
            writer.add_batch(["b.jpg", "c.jpg"], vectors, [FileStat(2, 2), FileStat(3, 3)])

    reader._db.set_trace_callback(commit_meanwhile)
    ids, vectors = reader.all_vectors()
    assert committed and len(ids) == len(vectors) == 1
    reader._db.set_trace_callback(None)
    assert len(reader.all_vectors()[0]) == 3  # the next snapshot sees the commit
