"""Issue 15, export-embeddings: chunked .npy files and paths.csv give back exactly the stored
vectors, row for row, streamed from one snapshot; a non-empty folder is refused without --force."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from factories import make_images, make_tiny_encoder

from mocoretrieval.cli import main
from mocoretrieval.errors import MoCoRetrievalError
from mocoretrieval.export_vectors import EXPORT_MANIFEST, PATHS_FILE, export_embeddings
from mocoretrieval.index import ImageIndex
from mocoretrieval.store import Store


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A float16 index of 11 images, one with a comma in its name (quoted in paths.csv)."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    make_tiny_encoder().save_pretrained(tmp / "encoder")
    root = tmp / "photos"
    make_images(root, 6)
    make_images(root / "sub", 4, seed=1)
    shutil.copy(root / "img_0001.png", root / "sub" / "a, b.png")
    index = ImageIndex.build(root, tmp / "encoder", workers=0, store_dtype="float16")
    # Re-embedded files get new, higher ids: the store's row order is no longer path order.
    for name, new in zip(["img_0000.jpg", "img_0002.jpg"], make_images(tmp / "new", 3, seed=7)):
        shutil.copy(new, root / name)
    assert len(index.update(workers=0).updated) == 2
    yield index
    index.close()


def _read_export(out) -> tuple[dict, np.ndarray, list[tuple[str, str]]]:
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    names = sorted(p.name for p in out.glob("vectors-*.npy"))
    assert names == [c["file"] for c in manifest["chunks"]]
    arrays = [np.load(out / name) for name in names]  # in name order, as documented
    with open(out / PATHS_FILE, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", "path"]
    return manifest, np.concatenate(arrays), rows[1:]


def test_the_export_round_trips_vectors_and_paths(indexed, tmp_path):
    """Catches chunks written out of order or misaligned with paths.csv (each row's vector must
    be its file's stored vector), and a chunking that drops or repeats rows."""
    report = export_embeddings(indexed.path, tmp_path / "out", chunk_rows=4)
    manifest, vectors, rows = _read_export(tmp_path / "out")
    n = len(indexed)
    assert report.count == manifest["count"] == n == 11 and len(rows) == n
    assert report.chunks == [c["file"] for c in manifest["chunks"]]
    assert [c["rows"] for c in manifest["chunks"]] == [4, 4, 3]
    assert [c["first_row"] for c in manifest["chunks"]] == [0, 4, 8]
    assert manifest["dim"] == indexed.dim and manifest["dtype"] == "float16" == vectors.dtype
    assert manifest["model"]["weights_hash"] == indexed.info()["weights_hash"]
    assert manifest["root"] == str(indexed.root)
    np.testing.assert_array_equal(vectors.astype(np.float32), indexed.store.all_vectors()[1])
    assert [int(r) for r, _ in rows] == list(range(n))
    assert sorted(p for _, p in rows) == sorted(indexed.store.files())
    assert [p for _, p in rows] != sorted(p for _, p in rows)  # row order is the store's
    assert "sub/a, b.png" in {p for _, p in rows}
    for (_, path), vector in zip(rows, vectors):
        np.testing.assert_array_equal(vector.astype(np.float32), indexed.store.vector(path))


def test_float32_export_of_a_float16_store_widens_exactly(indexed, tmp_path):
    """Catches ``--dtype`` being ignored (the store dtype written whatever was asked)."""
    export_embeddings(indexed.path, tmp_path / "out", dtype="float32")
    manifest, vectors, _ = _read_export(tmp_path / "out")
    assert manifest["dtype"] == "float32" and manifest["store_dtype"] == "float16"
    assert vectors.dtype == np.float32 and len(manifest["chunks"]) == 1
    np.testing.assert_array_equal(vectors, indexed.store.all_vectors()[1])


def test_the_export_streams_one_chunk_at_a_time(indexed, tmp_path, monkeypatch):
    """Catches an export that loads the whole store (``all_vectors``/``snapshot``) at once."""

    def whole(*args, **kwargs):
        raise AssertionError("the whole store was loaded into one array")

    monkeypatch.setattr(Store, "all_vectors", whole)
    monkeypatch.setattr(Store, "snapshot", whole)
    report = export_embeddings(indexed.path, tmp_path / "out", chunk_rows=4)
    assert len(report.chunks) == 3
    assert all(len(np.load(tmp_path / "out" / c)) <= 4 for c in report.chunks)


def test_a_non_empty_folder_is_refused_unless_forced(indexed, tmp_path):
    """Catches an export over a non-empty folder without --force, and a forced one that leaves
    the earlier export's extra chunks behind (or deletes files that are not its own)."""
    out = tmp_path / "out"
    export_embeddings(indexed.path, out, chunk_rows=2)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MoCoRetrievalError, match="not empty.*--force"):
        export_embeddings(indexed.path, out)
    assert len(list(out.glob("vectors-*.npy"))) == 6  # untouched
    report = export_embeddings(indexed.path, out, force=True)
    assert (
        sorted(p.name for p in out.glob("vectors-*.npy")) == report.chunks == ["vectors-00000.npy"]
    )
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoCoRetrievalError, match="is a file"):
        export_embeddings(indexed.path, tmp_path / "file", force=True)


def test_the_cli_exports_and_explains_a_refusal(indexed, tmp_path, capsys):
    """Catches the subcommand not being wired, or a refusal shown as a traceback."""
    out = tmp_path / "out"
    assert main(["export-embeddings", "--index", str(indexed.path), str(out)]) == 0
    assert f"wrote 11 {indexed.dim}-d float16 vectors in 1 .npy file" in capsys.readouterr().out
    assert main(["export-embeddings", "--index", str(indexed.path), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and "Traceback" not in err
    assert main(["export-embeddings", "--index", str(indexed.path), str(out), "--force"]) == 0
