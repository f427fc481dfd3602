"""Issue 13, defect 5: two writers replacing the same file must not collide on a fixed
temporary name (``manifest.json.tmp``, ``index.faiss.tmp``)."""

from __future__ import annotations

import json

import faiss
import numpy as np

from mocoretrieval import ann, layout


def test_two_writers_of_the_manifest_do_not_collide(tmp_path, monkeypatch):
    """Fails without the fix: the inner writer renames the shared ``manifest.json.tmp`` away and
    the outer one's rename raises FileNotFoundError."""
    path = tmp_path / "manifest.json"
    real_dump = json.dump
    nested = []

    def dump(data, f, **kw):  # a second writer saves the manifest while the first one writes
        if not nested:
            nested.append(1)
            layout.write_json_atomic(path, {"writer": 2})
        real_dump(data, f, **kw)

    monkeypatch.setattr(layout.json, "dump", dump)
    layout.write_json_atomic(path, {"writer": 1})
    assert json.loads(path.read_text()) == {"writer": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no stray temporary


def test_two_writers_of_the_faiss_file_do_not_collide(tmp_path, monkeypatch):
    """Fails without the fix, as above, for ``index.faiss.tmp``."""
    path = tmp_path / "index.faiss"
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    real_write = faiss.write_index
    nested = []

    def write_index(idx, name):  # a second writer saves between this one's write and rename
        real_write(idx, name)
        if not nested:
            nested.append(1)
            ann.save(idx, path)

    monkeypatch.setattr(faiss, "write_index", write_index)
    assert ann.save(index, path) == path.stat().st_size
    assert ann.load(path).ntotal == 4
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]
