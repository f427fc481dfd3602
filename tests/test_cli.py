"""The `mocoretrieval` command: index, search, duplicates, info through main(argv) and as a
subprocess; the JSON schemas; user errors as one line on stderr with exit status 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import make_images, make_tiny_encoder

from mocoretrieval.cli import main


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A folder indexed through `mocoretrieval index`, and the output of that run."""
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(11)  # weights of its own: the ONNX export cache is keyed by them
    make_tiny_encoder().save_pretrained(tmp / "encoder")
    root = tmp / "photos"
    make_images(root, 8)
    make_images(root / "sub", 4, seed=1)
    shutil.copy(root / "img_0001.png", root / "sub" / "copy.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root, tmp / "encoder"


def _index(root: Path, encoder: Path, *extra: str) -> int:
    return main(["index", str(root), "--model", str(encoder), "--workers", "0", "-q", *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_index_prints_a_summary_and_a_rerun_does_nothing(indexed, capsys):
    root, encoder = indexed
    capsys.readouterr()
    assert _index(root, encoder) == 0
    out = capsys.readouterr().out
    assert f"indexed {root}" in out and "13 images, Flat" in out
    assert "added 13, updated 0, removed 0, skipped 1 in " in out and "images/s" in out
    assert "skipped broken.jpg: not an image" in out
    assert _index(root, encoder) == 0
    assert "added 0, updated 0, removed 0, skipped 0" in capsys.readouterr().out


def test_search_json_schema(indexed, capsys):
    root, encoder = indexed
    _index(root, encoder)
    queries = [str(root / "img_0002.jpg"), str(root / "sub" / "img_0003.png")]
    capsys.readouterr()
    assert main(["search", *queries, "-k", "4", "--index", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 2
    for query, entry in zip(queries, out):
        assert set(entry) == {"query", "results"} and entry["query"] == query
        assert len(entry["results"]) == 4
        for hit in entry["results"]:
            assert set(hit) == {"path", "score"}
            assert isinstance(hit["score"], float) and Path(hit["path"]).is_file()
        scores = [hit["score"] for hit in entry["results"]]
        assert scores == sorted(scores, reverse=True)
        assert entry["results"][0]["path"] == query


def test_search_table_finds_the_index_from_the_current_folder(indexed, capsys, monkeypatch):
    root, encoder = indexed
    _index(root, encoder)
    monkeypatch.chdir(root / "sub")  # the index is in a parent folder
    capsys.readouterr()
    assert main(["search", "img_0000.jpg", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "img_0000.jpg:" and lines[1].split() == ["rank", "score", "path"]
    rank, score, path = lines[2].split()
    assert (rank, path) == ("1", "img_0000.jpg") and float(score) == pytest.approx(1, abs=1e-4)


def test_duplicates_json_and_table(indexed, capsys):
    root, encoder = indexed
    _index(root, encoder)
    capsys.readouterr()
    assert main(["duplicates", "--threshold", "0.99999", "--index", str(root), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert [sorted(Path(hit["path"]).name for hit in g["files"]) for g in groups] == [
        ["copy.png", "img_0001.png"]
    ]
    assert set(groups[0]) == {"id", "tier", "keep", "files"} and groups[0]["tier"] == "identical"
    assert all(set(hit) == {"path", "score", "action"} for hit in groups[0]["files"])
    assert sorted(hit["action"] for hit in groups[0]["files"]) == ["keep", "remove"]
    assert main(["duplicates", "--threshold", "0.99999", "--index", str(root)]) == 0
    out = capsys.readouterr().out
    assert "group 1: 2 images, identical" in out and "1 groups of near-duplicates" in out


def test_info(indexed, capsys):
    root, encoder = indexed
    _index(root, encoder)
    capsys.readouterr()
    assert main(["info", "--index", str(root / ".mocoretrieval")]) == 0
    out = capsys.readouterr().out
    for field in ("model:", "count:", "dim:", "index_type:", "last_update:", "skipped:"):
        assert field in out
    assert "broken.jpg: not an image" in out
    assert main(["info", "--index", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 13 and info["model"] == str(encoder.resolve())
    assert info["skipped"] == {"broken.jpg": "not an image"}


def test_user_errors_are_one_line_and_status_1(indexed, tmp_path, capsys, monkeypatch):
    root, encoder = indexed
    _index(root, encoder)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()

    assert main(["search", str(root / "img_0000.jpg")]) == 1  # no index here or above
    assert "mocoretrieval index" in _error_line(capsys)
    assert main(["info", "--index", str(tmp_path)]) == 1
    _error_line(capsys)
    assert main(["index", str(tmp_path / "missing"), "-q"]) == 1
    assert "not a folder" in _error_line(capsys)
    assert main(["search", str(tmp_path / "nope.jpg"), "--index", str(root)]) == 1
    assert "nope.jpg: no such file" in _error_line(capsys)
    assert _index(root, encoder, "--index-type", "NotAFactory") == 1
    assert "factory" in _error_line(capsys)

    torch.manual_seed(12)
    make_tiny_encoder().save_pretrained(tmp_path / "other")
    assert _index(root, tmp_path / "other") == 1
    line = _error_line(capsys)
    assert "--rebuild" in line and "--index" in line


def test_as_a_subprocess(indexed, tmp_path):
    root, encoder = indexed
    _index(root, encoder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mocoretrieval"]
    query = str(root / "img_0004.jpg")
    run = subprocess.run(
        [*cmd, "search", query, "-k", "1", "--index", str(root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert json.loads(run.stdout) == [
        {"query": query, "results": [{"path": query, "score": pytest.approx(1, abs=1e-4)}]}
    ]
    run = subprocess.run(
        [*cmd, "info", "--index", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: no index at") and run.stderr.count("\n") == 1


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_rerun_and_search_reload_the_model_from_where_it_was_loaded(tmp_path, capsys, backend):
    # The encoder's config names its provenance, which is not a loadable source: the index must
    # record the directory the user passed, or a re-run without --model cannot find the model.
    torch.manual_seed(12)
    make_tiny_encoder(source="trained on my laptop").save_pretrained(tmp_path / "enc")
    root = tmp_path / "photos"
    make_images(root, 4)
    common = ["--workers", "0", "-q", "--backend", backend]
    assert main(["index", str(root), "--model", str(tmp_path / "enc"), *common]) == 0
    make_images(root / "more", 2, seed=3)
    assert main(["index", str(root), *common]) == 0
    assert "added 2" in capsys.readouterr().out
    query = str(root / "more" / "img_0000.jpg")
    assert main(["search", query, "--index", str(root), "--json", "--backend", backend]) == 0
    results = json.loads(capsys.readouterr().out)[0]["results"]
    assert Path(results[0]["path"]).name == "img_0000.jpg"


def test_first_onnx_run_says_it_exports_once(tmp_path, capsys):
    torch.manual_seed(21)
    make_tiny_encoder().save_pretrained(tmp_path / "enc")  # new weights: nothing cached yet
    root = tmp_path / "photos"
    make_images(root, 3)
    args = ["index", str(root), "--model", str(tmp_path / "enc"), "--workers", "0"]
    assert main([*args, "--backend", "onnx"]) == 0
    assert "exporting the model to ONNX once" in capsys.readouterr().err
    assert main([*args, "--backend", "onnx", "--rebuild"]) == 0  # cached: nothing to wait for
    assert "exporting" not in capsys.readouterr().err
    assert main([*args, "--backend", "onnx", "--rebuild", "-q"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_rerun_on_unchanged_folder_loads_no_model(tmp_path, capsys, monkeypatch, backend):
    from mocoretrieval import models, sources

    torch.manual_seed(22)
    make_tiny_encoder().save_pretrained(tmp_path / "enc")
    root = tmp_path / "photos"
    make_images(root, 3)
    common = ["--workers", "0", "-q", "--backend", backend]
    assert main(["index", str(root), "--model", str(tmp_path / "enc"), *common]) == 0
    loads: list[str] = []  # which loader ran, in order
    real_load, real_backend = sources.load, models.load_backend
    monkeypatch.setattr(sources, "load", lambda *a, **k: loads.append("load") or real_load(*a, **k))
    monkeypatch.setattr(
        models,
        "load_backend",
        lambda *a, **k: loads.append("backend") or real_backend(*a, **k),
    )
    assert main(["index", str(root), *common]) == 0
    assert "added 0" in capsys.readouterr().out and loads == []
    # The index's own model is still loaded when there is work to do.
    make_images(root / "new", 1, seed=5)
    assert main(["index", str(root), *common]) == 0
    assert "added 1" in capsys.readouterr().out
    assert loads == (["backend", "load"] if backend == "onnx" else ["load"])
