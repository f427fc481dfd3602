"""ImageIndex on generated folders with a tiny encoder: search, incremental updates, broken files,
model pinning, a stale or corrupt FAISS file, and a kill -9 in the middle of a real run."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from factories import make_images, make_tiny_encoder
from PIL import Image
from test_data import make_broken_files

import mocoretrieval
from mocoretrieval import embed
from mocoretrieval.errors import IndexFormatError, MoCoRetrievalError, ModelMismatchError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import UpdateLock
from mocoretrieval.store import FileStat, Store

WORKERS = 0  # decode in the test process: no worker start-up cost


def _images(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".mocoretrieval" not in p.parts and p.suffix in (".jpg", ".png")
    )


def _assert_matches_folder(index: ImageIndex, root: Path) -> None:
    """Every image of the folder is in the index exactly once and is its own best match (tied
    only with exact copies of itself)."""
    expected = _images(root)
    assert sorted(index.store.files()) == expected
    assert len(index) == len(expected)
    for path, hits in zip(expected, index.search_batch([root / p for p in expected], k=3)):
        best = {Path(h.path).relative_to(root).as_posix() for h in hits if h.score > 1 - 1e-5}
        assert path in best, (path, hits)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder indexed once with a saved tiny encoder, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("built")
    torch.manual_seed(0)
    make_tiny_encoder().save_pretrained(tmp / "encoder")
    root = tmp / "photos"
    make_images(root, 12)
    make_images(root / "sub", 6, seed=1)
    shutil.copy(root / "img_0003.png", root / "sub" / "copy_of_3.png")
    index = ImageIndex.build(root, model=tmp / "encoder", workers=WORKERS)
    yield index, root, tmp / "encoder"
    index.close()


def test_every_image_finds_itself_first(built):
    index, root, _ = built
    assert len(index.last_report.added) == 19 and not index.last_report.skipped
    _assert_matches_folder(index, root)
    results = index.search(root / "img_0005.png", k=5)
    assert len(results) == 5
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_query_by_image_by_path_and_by_vector_agree(built):
    index, root, _ = built
    path = root / "sub" / "img_0002.jpg"
    by_path = index.search(str(path), k=3)
    by_image = index.search(Image.open(path), k=3)
    vector = index.encoder.embed([Image.open(path)])[0]
    by_vector = index.search(vector * 3.0, k=3)  # scale does not matter: queries are normalised
    assert [r.path for r in by_path] == [r.path for r in by_image] == [r.path for r in by_vector]
    assert by_path[0].path == str(path)
    with pytest.raises(ModelMismatchError, match="dimensions"):
        index.search(np.ones(7, np.float32))


def test_duplicates_groups_copies_only(built):
    index, _, _ = built
    groups = index.duplicates(threshold=0.99999)
    assert [sorted(Path(r.path).name for r in g) for g in groups] == [
        ["copy_of_3.png", "img_0003.png"]
    ]
    assert all(r.score == pytest.approx(1.0, abs=1e-5) for r in groups[0])


def test_paths_and_relative_paths_of_results(built):
    index, root, _ = built
    assert index.paths() == _images(root)
    results = index.search(root / "sub" / "img_0002.jpg", k=4)
    assert results[0].relpath == "sub/img_0002.jpg"
    for r in results:
        assert r.path == str(root / r.relpath) and r.relpath in index.paths()
    groups = index.duplicates(threshold=0.99999)
    assert sorted(r.relpath for r in groups[0]) == ["img_0003.png", "sub/copy_of_3.png"]


def test_paths_leave_out_skipped_files(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 3)
    (root / "broken.jpg").write_bytes(b"not an image")
    with ImageIndex.build(root, model=tiny_encoder, workers=WORKERS) as index:
        assert "broken.jpg" in index.info()["skipped"]
        assert index.paths() == ["img_0000.jpg", "img_0001.png", "img_0002.jpg"]


def test_thumbnail_of_an_indexed_image_or_an_error_that_says_why(tmp_path, tiny_encoder):
    from mocoretrieval.embed import DEFAULT_THUMBNAIL_SIZE
    from mocoretrieval.errors import ImageError

    root = tmp_path / "photos"
    make_images(root, 3)
    (root / "broken.jpg").write_bytes(b"not an image")
    with ImageIndex.build(root, model=tiny_encoder, workers=WORKERS) as index:
        thumb = index.thumbnail("img_0001.png")
        assert thumb.format == "JPEG" and max(thumb.size) <= DEFAULT_THUMBNAIL_SIZE
        jpeg = index.store.thumbnails(["img_0001.png"])["img_0001.png"].jpeg
        with Image.open(io.BytesIO(jpeg)) as expected:
            assert thumb.tobytes() == expected.tobytes()
        for path in ("nope.jpg", "broken.jpg", str(root / "img_0001.png")):
            with pytest.raises(ImageError, match="not in the index.*ImageIndex.paths"):
                index.thumbnail(path)
        Image.new("RGB", (20, 20)).save(root / "img_0002.jpg")  # edited, not re-indexed
        with pytest.raises(ImageError, match="changed since it was indexed"):
            index.thumbnail("img_0002.jpg")
        (root / "img_0000.jpg").unlink()
        with pytest.raises(ImageError, match="file not found"):
            index.thumbnail("img_0000.jpg")
        index.update(workers=WORKERS)
        assert index.thumbnail("img_0002.jpg").size == (20, 20)  # re-made with the file
        index.store._db.execute("DELETE FROM thumbnails")  # as an index built before them
        with pytest.raises(ImageError, match="no stored thumbnail"):
            index.thumbnail("img_0002.jpg")


def test_stored_vector_of_an_indexed_image(built):
    """`vector` gives the embedding stored at indexing time (the one a search by the file
    computes again), and `in` says which paths are indexed. Checked: with the query's
    `WHERE f.path=? OR 1` (every path given the first row's vector) it fails."""
    from mocoretrieval.errors import ImageError

    index, root, _ = built
    for rel in ("img_0001.png", "sub/img_0002.jpg"):
        assert rel in index
        vector = index.vector(rel)
        assert vector.shape == (index.dim,) and vector.dtype == np.float32
        assert np.allclose(vector, index.embed_queries([root / rel])[0], atol=1e-5)
        assert index.search(vector, k=1)[0].relpath == rel
    for rel in ("nope.jpg", str(root / "img_0001.png"), "../photos/img_0001.png"):
        assert rel not in index
        with pytest.raises(ImageError, match="not in the index.*ImageIndex.paths"):
            index.vector(rel)
    assert 3 not in index


def test_info(built):
    index, root, encoder_dir = built
    info = index.info()
    assert info["model"] == str(encoder_dir.resolve())
    assert info["count"] == 19 and info["dim"] == 512
    assert info["index_type"] == "Flat" and info["metric"] == "inner_product"
    assert info["last_update"] and info["skipped"] == {}
    manifest = json.loads((root / ".mocoretrieval" / "manifest.json").read_text())
    assert manifest["encoder"]["weights_hash"] == index.encoder.weights_hash()
    assert manifest["root"] == ".."  # relative: the folder can move with its index


def test_rerun_on_unchanged_folder_does_no_model_work(built, monkeypatch):
    _, root, _ = built

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran on an unchanged folder")

    monkeypatch.setattr(embed, "iter_embeddings", no_model)
    reopened = ImageIndex.open(root)
    report = reopened.update(workers=WORKERS)
    assert (report.added, report.updated, report.removed, report.skipped) == ([], [], [], {})
    assert reopened._encoder is None  # not even loaded
    reopened.close()


def test_add_modify_delete_then_rerun_matches_folder(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 8)
    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    old_id = index.store.files()["img_0002.jpg"].vector_id

    (root / "img_0001.png").unlink()
    make_images(root / "new", 3, seed=7)
    Image.open(root / "img_0004.jpg").rotate(90).save(root / "img_0002.jpg")  # changed content
    calls = []
    report = index.update(workers=WORKERS, batch_size=2, progress=lambda *a: calls.append(a))

    assert calls[0] == (0, 4) and calls[-1] == (4, 4) and len(calls) == 3  # start + 2 batches
    assert report.removed == ["img_0001.png"]
    assert report.added == ["new/img_0000.jpg", "new/img_0001.png", "new/img_0002.jpg"]
    assert report.updated == ["img_0002.jpg"]
    _assert_matches_folder(index, root)
    assert index.store.files()["img_0002.jpg"].vector_id != old_id  # re-embedded
    assert index.store.count() == 10  # and its old vector deleted


def test_thumbnails_are_stored_at_index_time_and_follow_their_files(tmp_path, tiny_encoder):
    import io

    from mocoretrieval.data import load_image
    from mocoretrieval.embed import DEFAULT_THUMBNAIL_SIZE

    root = tmp_path / "photos"
    make_images(root, 6)
    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    paths = _images(root)
    thumbs = index.store.thumbnails(paths)
    assert sorted(thumbs) == paths
    for rel, stored in thumbs.items():
        st = os.stat(root / rel)
        assert stored.stat == (st.st_size, st.st_mtime_ns)
        expected = load_image(root / rel, tiny_encoder.resize_size)  # as decoded for the model
        expected.thumbnail((DEFAULT_THUMBNAIL_SIZE, DEFAULT_THUMBNAIL_SIZE))
        with Image.open(io.BytesIO(stored.jpeg)) as img:
            assert img.format == "JPEG" and img.size == expected.size

    (root / "img_0001.png").unlink()
    index.update(workers=WORKERS)
    assert sorted(index.store.thumbnails(paths)) == [p for p in paths if p != "img_0001.png"]
    count = index.store._db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0]
    assert count == len(paths) - 1  # the removed file's thumbnail went with it
    index.close()


def test_broken_files_are_skipped_with_reasons_and_not_retried(tmp_path, tiny_encoder, monkeypatch):
    root = tmp_path / "photos"
    make_images(root, 4)
    expected = make_broken_files(root / "bad")
    Image.new("RGB", (300, 300)).save(root / "bad" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)  # in-process: WORKERS = 0
    expected["bomb.png"] = "decompression bomb"

    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    report = index.last_report
    assert sorted(report.added) == sorted(p.name for p in root.glob("img_*"))
    reasons = {Path(p).name: reason for reason, paths in report.skipped.items() for p in paths}
    assert sorted(reasons) == sorted(expected)
    for name, prefix in expected.items():
        assert reasons[name].startswith(prefix), (name, reasons[name])
    assert len(index) == 4 and set(index.info()["skipped"]) == {f"bad/{n}" for n in expected}

    monkeypatch.setattr(embed, "iter_embeddings", lambda *a, **k: pytest.fail("retried"))
    assert index.update(workers=WORKERS).num_skipped == 0  # unchanged bad files: not retried


def test_a_fixed_file_is_picked_up(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 3)
    (root / "later.jpg").write_bytes(b"")
    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    assert index.last_report.skipped == {"empty file": ["later.jpg"]}
    shutil.copy(root / "img_0000.jpg", root / "later.jpg")
    report = index.update(workers=WORKERS)
    assert report.updated == ["later.jpg"] and index.info()["skipped"] == {}
    assert len(index) == 4


def test_model_is_pinned(built, tmp_path):
    _, root, encoder_dir = built
    torch.manual_seed(1)
    other = make_tiny_encoder()
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelMismatchError, match="built with"):
        ImageIndex.open(root, model=other)
    with pytest.raises(ModelMismatchError, match="--rebuild"):
        ImageIndex.create(root, model=tmp_path / "other")
    same = ImageIndex.open(root, model=encoder_dir)  # the same weights: accepted
    assert same.search(root / "img_0000.jpg", k=1)[0].path == str(root / "img_0000.jpg")


def test_rebuild_with_another_model(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 5)
    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    torch.manual_seed(1)
    other = make_tiny_encoder()
    rebuilt = ImageIndex.build(root, model=other, rebuild=True, workers=WORKERS)
    assert len(rebuilt.last_report.added) == 5 and len(rebuilt) == 5
    assert rebuilt.info()["weights_hash"] == other.weights_hash()
    with pytest.raises(ModelMismatchError):
        ImageIndex.open(root, model=tiny_encoder)
    index.close()


def test_stale_missing_or_corrupt_faiss_file_is_rebuilt_from_stored_vectors(
    built, tmp_path, monkeypatch
):
    _, root, _ = built
    copy = tmp_path / "photos"
    shutil.copytree(root, copy)
    faiss_file = copy / ".mocoretrieval" / "index.faiss"
    monkeypatch.setattr(embed, "iter_embeddings", lambda *a, **k: pytest.fail("model ran"))

    faiss_file.write_bytes(b"garbage" * 10)
    index = ImageIndex.open(copy)
    _assert_matches_folder(index, copy)  # the query images are embedded, the index is not
    # A reader rebuilds in memory and never writes (issue 13: it holds no lock); the next
    # update, which does, saves the file again.
    assert faiss_file.stat().st_size == 70
    index.update(workers=WORKERS)
    assert faiss_file.stat().st_size > 100

    faiss_file.unlink()
    assert ImageIndex.open(copy).search(copy / "img_0000.jpg", k=1)[0].path.endswith("0000.jpg")
    assert not faiss_file.is_file()

    # A batch committed after the FAISS file was written (a crash before it was rebuilt).
    index = ImageIndex.open(copy)
    vector = index.store.all_vectors()[1][0]
    Store(index.store.path, index.dim).add_batch(["extra.jpg"], vector[None], [FileStat(1, 1)])
    fresh = ImageIndex.open(copy)
    assert {Path(r.path).name for r in fresh.search(vector, k=2)} >= {"extra.jpg"}
    assert fresh.info()["count"] == 20


def test_index_type_factory_string_and_tuning(built, tmp_path):
    _, root, _ = built
    copy = tmp_path / "photos"
    shutil.copytree(root, copy)
    index = ImageIndex.create(copy, index_type="IVF4,Flat")
    index.update(workers=WORKERS)  # nothing to embed: the FAISS index is rebuilt and tuned
    info = index.info()
    assert info["index_type"] == "IVF4,Flat" and set(info["search_params"]) == {"nprobe"}
    assert info["recall_at_10"] >= 0.95
    _assert_matches_folder(index, copy)

    def centroids():
        quantizer = faiss.extract_index_ivf(index.faiss.get()).quantizer
        return quantizer.reconstruct_n(0, quantizer.ntotal)

    before = centroids()
    make_images(copy / "more", 2, seed=5)
    assert len(index.update(workers=WORKERS).added) == 2
    np.testing.assert_array_equal(centroids(), before)  # k-means kept, lists refilled
    assert index.manifest["faiss"]["trained_on"] == 19 and len(index) == 21
    _assert_matches_folder(index, copy)
    with pytest.raises(MoCoRetrievalError, match="factory"):
        ImageIndex.create(copy, index_type="NotAnIndex42")


def test_a_second_concurrent_update_is_refused(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 2)
    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    with UpdateLock(index.path), pytest.raises(MoCoRetrievalError, match="another"):
        index.update(workers=WORKERS)
    assert index.update(workers=WORKERS).added == []  # released


def test_user_errors_are_domain_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="mocoretrieval index"):
        ImageIndex.open(tmp_path)
    with pytest.raises(MoCoRetrievalError, match="not a folder"):
        ImageIndex.create(tmp_path / "missing")


def test_newer_format_is_refused(built, tmp_path):
    _, root, _ = built
    copy = tmp_path / "photos"
    shutil.copytree(root, copy)
    manifest = copy / ".mocoretrieval" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="upgrade"):
        ImageIndex.open(copy)


def test_index_dir_outside_and_inside_root(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 3)
    outside = ImageIndex.build(root, model=tiny_encoder, index_dir=tmp_path / "idx", workers=0)
    assert outside.root == root.resolve() and len(outside) == 3
    assert not (root / ".mocoretrieval").exists()
    # A visible index folder inside the root is not indexed itself.
    inside = ImageIndex.build(root, model=tiny_encoder, index_dir=root / "index", workers=0)
    Image.new("RGB", (8, 8)).save(root / "index" / "stray.png")
    assert len(inside) == 3 and inside.update(workers=0).added == []


def test_import_does_not_need_faiss():
    code = (
        "import sys; sys.modules['faiss'] = None\n"  # makes `import faiss` fail
        "import mocoretrieval, training\n"
        "print(mocoretrieval.ImageIndex.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ImageIndex"
    assert "ImageIndex" in mocoretrieval.__all__


N_KILL = 120  # files in the kill -9 test: enough batches of 4 to be killed in the middle


def _committed_rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_kill_9_mid_run_then_rerun_has_every_file_exactly_once(tmp_path):
    encoder_dir = tmp_path / "encoder"
    make_tiny_encoder(input_size=16, resize_size=16).save_pretrained(encoder_dir)
    root = tmp_path / "photos"
    make_images(root, N_KILL, size=(16, 16))
    make_broken_files(root / "bad")
    db = root / ".mocoretrieval" / "index.db"
    cmd = [
        sys.executable,
        "-m",
        "mocoretrieval",
        "index",
        str(root),
        "--model",
        str(encoder_dir),
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--backend",
        "torch",  # crash safety does not depend on the backend; skips the ONNX export
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed_rows(db) < 8:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no batch committed within 2 minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _committed_rows(db)
    assert 8 <= done_before < N_KILL + 4, "the run finished before it was killed: add images"

    rerun = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr == ""  # --quiet, and no terminal: no progress bar
    index = ImageIndex.open(root)
    counts = re.match(
        r"added (\d+), updated 0, removed 0, skipped (\d+)", rerun.stdout.split("\n")[1]
    )
    assert (
        counts and int(counts[1]) + int(counts[2]) == N_KILL + 4 - done_before
    )  # only what was left
    files = index.store.files()
    good = [p for p in _images(root) if not p.startswith("bad/")]
    assert sorted(p for p, rec in files.items() if rec.vector_id is not None) == good
    assert len(index) == len(good) == N_KILL  # one vector per good file: none lost, none twice
    assert len(index.store.skipped()) == 4
    ids = [rec.vector_id for rec in files.values() if rec.vector_id is not None]
    assert len(set(ids)) == len(ids)
    hits = index.search_batch([root / p for p in good[::16]], k=1)
    assert [Path(h[0].path).relative_to(root).as_posix() for h in hits] == good[::16]


def test_a_worker_death_reported_between_batches_keeps_work_and_says_rerun(tmp_path, tiny_encoder):
    # torch raises a dead worker's error from its SIGCHLD handler, which may fire while the
    # index is committing rather than inside iter_embeddings (which recovers from it).
    root = tmp_path / "photos"
    make_images(root, 6)
    index = ImageIndex.create(root, model=tiny_encoder)

    def progress(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Killed. ")

    with pytest.raises(MoCoRetrievalError, match="2 files done so far are saved: run the same"):
        index.update(workers=WORKERS, batch_size=2, progress=progress)
    assert index.store.count() == 2  # the batch before the report is committed
    report = index.update(workers=WORKERS, batch_size=2)
    assert len(report.added) == 4
    _assert_matches_folder(index, root)
