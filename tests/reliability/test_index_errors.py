"""Issue 13, defects 7, 9 and 13: a read-only index, an --index-type FAISS cannot build, and a
full disk: each a one-line error (or none), never a traceback, and nothing half-changed."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from factories import make_images

from mocoretrieval import cli, store
from mocoretrieval.errors import MoCoRetrievalError
from mocoretrieval.index import ImageIndex

REPO = Path(__file__).resolve().parents[2]


def _as_unprivileged() -> list[str]:
    """A command prefix under which file permissions apply, also when the tests run as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def _chmod_tree(root: Path, write: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if write else mode & ~0o222)


def test_a_read_only_index_searches_and_says_what_updating_needs(indexed, two_models):
    """Defect 7. Fails without the fix: `info` and `search` failed with "attempt to write a
    readonly database ... Delete the index directory"."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prefix = [*_as_unprivileged(), sys.executable, "-m", "mocoretrieval"]
    query = str(indexed / "img_0002.jpg")
    _chmod_tree(indexed, write=False)
    try:

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*prefix, *args], check=False, capture_output=True, text=True, env=env
            )

        info = run("info", "--index", str(indexed), "--json")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["count"] == 8
        found = run("search", query, "--index", str(indexed), "--backend", "torch", "--json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)[0]["results"][0]["path"].endswith("img_0002.jpg")
        dups = run("duplicates", "--index", str(indexed))
        assert dups.returncode == 0, dups.stderr
        update = run("index", str(indexed), "--backend", "torch", "--workers", "0", "-q")
        assert update.returncode == 1 and "write access" in update.stderr
        for out in (info, found, dups, update):
            assert "Traceback" not in out.stderr and "Delete" not in out.stderr, out.stderr
    finally:
        _chmod_tree(indexed, write=True)
    assert not (indexed / ".mocoretrieval" / "index.db-wal").exists()  # nothing was written


def test_an_index_type_faiss_cannot_build_is_not_kept(indexed):
    """Defect 9. Fails without the fix: the factory string was saved before FAISS failed to
    build it, and stuck for every later run; ``auto`` was refused as a factory string."""
    manifest = indexed / ".mocoretrieval" / "manifest.json"
    with pytest.raises(MoCoRetrievalError, match="needs at least as many images"):
        ImageIndex.build(indexed, index_type="IVF4096,Flat", workers=0)
    with pytest.raises(MoCoRetrievalError, match="keeps 'auto'"):
        ImageIndex.build(indexed, index_type="PQ8", workers=0)  # 8 vectors for 256 centroids
    assert json.loads(manifest.read_text())["index_type"] == "auto"
    index = ImageIndex.build(indexed, index_type="HNSW8,Flat", workers=0)
    assert json.loads(manifest.read_text())["index_type"] == "HNSW8,Flat"
    assert ImageIndex.build(indexed, index_type="auto", workers=0).info()["index_type"] == "Flat"
    assert len(index) == 8


def test_a_full_disk_is_one_line_and_keeps_the_work_done(indexed, monkeypatch, capsys):
    """Defect 13. Fails without the fix: the raw sqlite3.OperationalError escaped main()."""
    make_images(indexed / "more", 12, seed=3)
    pages = (
        sqlite3.connect(indexed / ".mocoretrieval" / "index.db")
        .execute("PRAGMA page_count")
        .fetchone()[0]
    )
    real_connect = sqlite3.connect

    def small_disk(*args, **kwargs):  # SQLite's own SQLITE_FULL, a few pages from now
        db = real_connect(*args, **kwargs)
        db.execute(f"PRAGMA max_page_count={pages + 12}")
        return db

    monkeypatch.setattr(store.sqlite3, "connect", small_disk)
    args = ["index", str(indexed), "--backend", "torch", "--workers", "0", "--batch-size", "2"]
    assert cli.main([*args, "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "full" in err and "work committed so far is kept" in err
    kept = len(ImageIndex.open(indexed))
    monkeypatch.undo()  # space freed: the same command continues
    assert cli.main([*args, "-q"]) == 0
    out = capsys.readouterr().out
    assert "20 images" in out and f"added {20 - kept}," in out
