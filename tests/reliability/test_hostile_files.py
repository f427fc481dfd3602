"""Issue 13, defects 4, 11 and 15: a FIFO, dangling links, symlink loops and names that are not
UTF-8 in the folder; a stuck decoder; a killed indexer's workers; a folder that cannot be listed
or that lists nothing (an unmounted drive).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import make_images

from mocoretrieval import data, decode_pool
from mocoretrieval.cli import main
from mocoretrieval.index import ImageIndex

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "mocoretrieval", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _hostile_folder(root: Path) -> dict[str, str]:
    """Four good images and the hostile entries, with the reason each must be listed with."""
    make_images(root, 4)
    os.mkfifo(root / "x.jpg")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    expected = {
        "x.jpg": "not a regular file (a FIFO)",
        "dangling.jpg": "broken link",
        "loop.jpg": "symlink loop",
    }
    try:
        (root / "photo-\udcff.jpg").write_bytes((root / "img_0000.jpg").read_bytes())
        expected["photo-\\xff.jpg"] = "name is not valid UTF-8: rename it to index it"
    except (OSError, UnicodeEncodeError):  # a filesystem that refuses such names
        pass
    return expected


def test_hostile_corpus_is_indexed_and_listed_without_hanging(tmp_path, two_models):
    """Defects 4 and 15. Fails without the fix: `index` blocked forever opening the FIFO (here:
    the subprocess timed out, at 300 s: generous for a loaded machine); once past it, the links and the non-UTF-8 name were dropped
    without appearing in the skip list or `info`."""
    root = tmp_path / "photos"
    expected = _hostile_folder(root)
    common = ["--backend", "torch", "--device", "cpu"]
    try:
        out = _run("index", str(root), "--model", str(two_models[0]), "--workers", "0", *common)
    except subprocess.TimeoutExpired:
        pytest.fail("`mocoretrieval index` hung on the hostile folder")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "4 images" in out.stdout
    for name, reason in expected.items():
        assert f"skipped {name}: {reason}" in out.stdout, out.stdout
    info = _run("info", "--index", str(root), "--json")
    assert info.returncode == 0 and "Traceback" not in info.stderr
    assert json.loads(info.stdout)["skipped"] == dict(sorted(expected.items()))
    again = _run("index", str(root), "--workers", "0", *common)  # nothing new to report
    assert again.returncode == 0 and "skipped 0" in again.stdout, again.stdout


def _hang_on(name: str, seconds: float):
    real = data.load_image

    def load_image(path, *args, **kwargs):
        if os.path.basename(path) == name:
            Path(os.environ["HANG_PID_FILE"]).write_text(str(os.getpid()))
            time.sleep(seconds)  # a decoder stuck on a hostile file
        return real(path, *args, **kwargs)

    return load_image


def test_a_stuck_decoder_is_a_skipped_file_with_its_reason(tmp_path, monkeypatch, two_models):
    """Defect 4. Fails without the fix: the run waited for the stuck decoder (120 s here) and
    then embedded the file. The 5 s timeout leaves room for a loaded machine's slow starts."""
    root = tmp_path / "photos"
    make_images(root, 4)
    monkeypatch.setenv("HANG_PID_FILE", str(tmp_path / "pid"))
    monkeypatch.setattr(data, "load_image", _hang_on("img_0001.png", 120))
    monkeypatch.setattr(decode_pool, "DECODE_TIMEOUT_S", 5.0)
    t0 = time.monotonic()
    report = ImageIndex.build(root, model=two_models[0], workers=1, batch_size=2).last_report
    assert time.monotonic() - t0 < 110
    assert report.skipped == {"decoding took over 5 s": ["img_0001.png"]}
    assert sorted(report.added) == ["img_0000.jpg", "img_0002.jpg", "img_0003.png"]


def test_a_stuck_decoder_without_workers_is_a_skipped_file(tmp_path, monkeypatch, two_models):
    """Defect 4 with --workers 0. Fails without the fix: the run waited for the decoder stuck in
    its own process (20 s here) and then embedded the file."""
    root = tmp_path / "photos"
    make_images(root, 4)
    monkeypatch.setenv("HANG_PID_FILE", str(tmp_path / "pid"))
    monkeypatch.setattr(data, "load_image", _hang_on("img_0001.png", 20))
    monkeypatch.setattr(decode_pool, "DECODE_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    report = ImageIndex.build(root, model=two_models[0], workers=0, batch_size=2).last_report
    assert time.monotonic() - t0 < 15
    assert report.skipped == {"decoding took over 1 s": ["img_0001.png"]}
    assert sorted(report.added) == ["img_0000.jpg", "img_0002.jpg", "img_0003.png"]


_ORPHAN = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from factories import make_tiny_encoder
from mocoretrieval import data, embed

def load_image(path, *a, **k):
    Path(os.environ["HANG_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(600)

data.load_image = load_image
for _ in embed.iter_embeddings(make_tiny_encoder(), {root!r}, ["img_0000.jpg"], workers=1):
    pass
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decoding_workers_die_with_their_parent(tmp_path):
    """Defect 4. Fails without the fix: after `kill -9` of the indexer, its worker stuck in a
    decoder lived on."""
    root = tmp_path / "photos"
    make_images(root, 1)
    pid_file = tmp_path / "pid"
    script = _ORPHAN.format(tests=str(REPO / "tests"), root=str(root))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HANG_PID_FILE": str(pid_file)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 300  # the child imports torch: slow on a loaded machine
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert worker != parent.pid and _alive(worker)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


def test_a_folder_that_cannot_be_listed_keeps_its_entries(tmp_path, monkeypatch, two_models):
    """Defect 11. Fails without the fix: the images of the folder that could not be listed (an
    unmounted network drive, a permission change) were removed from the index."""
    root = tmp_path / "photos"
    make_images(root, 2)
    make_images(root / "nas", 3, seed=1)
    index = ImageIndex.build(root, model=two_models[0], workers=0)
    assert len(index) == 5
    real_scandir = os.scandir
    blocked = str(root / "nas")

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = index.update(workers=0)
    assert report.removed == [] and len(index) == 5
    assert report.unreadable == {"nas": "cannot list it: permission denied"}
    monkeypatch.undo()
    (root / "nas" / "img_0000.jpg").unlink()
    assert index.update(workers=0).removed == ["nas/img_0000.jpg"]  # listable again: in step


def _unmount(folder: Path, away: Path) -> None:
    """What an unmounted drive leaves: its mount point, an empty folder."""
    folder.rename(away)
    folder.mkdir()


def test_an_empty_folder_keeps_its_entries_until_pruned(tmp_path, two_models, capsys):
    """Defect 11. Fails without the fix: the images of an unmounted drive (its mount point now an
    empty folder) were removed from the index, all to be embedded again."""
    root = tmp_path / "photos"
    make_images(root, 2)
    make_images(root / "nas" / "2023", 3, seed=1)
    make_images(root / "nas", 1, seed=2)
    index = ImageIndex.build(root, model=two_models[0], workers=0)
    assert len(index) == 6
    _unmount(root / "nas", tmp_path / "away")
    report = index.update(workers=0)
    assert report.removed == [] and report.empty == {"nas": 4} and len(index) == 6
    args = ["index", str(root), "--workers", "0", "-q", "--backend", "torch"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "removed 0" in out and "nas/ is empty but held 4 indexed images: kept" in out
    assert "--prune-empty" in out
    assert main([*args, "--prune-empty"]) == 0
    assert "removed 4" in capsys.readouterr().out
    index.close()
    with ImageIndex.open(root) as reopened:
        assert len(reopened) == 2


def test_an_empty_root_keeps_every_entry(tmp_path, two_models):
    """Defect 11. Fails without the fix: an index of an unmounted drive's root (empty but for the
    index folder) forgot every image."""
    root = tmp_path / "photos"
    make_images(root / "sub", 3)
    index = ImageIndex.build(root, model=two_models[0], workers=0, index_dir=tmp_path / "idx")
    _unmount(root, tmp_path / "away")
    report = index.update(workers=0)
    assert report.removed == [] and report.empty == {".": 3} and len(index) == 3
    assert len(index.update(workers=0, prune_empty=True).removed) == 3 and len(index) == 0


def test_a_deleted_folder_or_emptied_one_with_leftovers_is_a_deletion(tmp_path, two_models):
    """Defect 11, the other side: a folder deleted outright, or emptied of its images but not of
    everything (a .DS_Store), is a deletion as before. Passes before the fix too (but for the new
    ``empty`` field): it guards the fix against keeping real deletions."""
    root = tmp_path / "photos"
    make_images(root, 2)
    make_images(root / "trip", 3, seed=1)
    make_images(root / "old", 2, seed=2)
    index = ImageIndex.build(root, model=two_models[0], workers=0)
    shutil.rmtree(root / "trip")
    for p in (root / "old").iterdir():
        p.unlink()
    (root / "old" / ".DS_Store").write_bytes(b"\0")
    report = index.update(workers=0)
    assert report.empty == {} and len(report.removed) == 5 and len(index) == 2
