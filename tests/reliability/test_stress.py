"""Issue 13: a writer process re-indexing (updates and --rebuild with another model) while
reader processes keep the index open and search it. Bounded: a fixed number of rounds.

Repeat it with ``MOCORETRIEVAL_STRESS_ROUNDS`` (default 4) and, for the record of 20 runs in
a row, ``for i in $(seq 20); do PYTHONPATH=$PWD python -m pytest -q tests/reliability/test_stress.py
|| break; done``. No run leaves a process behind, however it ends: see
:func:`stress_roles.running` and the guard's own tests below.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stress_roles
from factories import make_images

from mocoretrieval.index import ImageIndex

READERS = 3
ROUNDS = int(os.environ.get("MOCORETRIEVAL_STRESS_ROUNDS", "4"))
HERE = Path(__file__).resolve().parent


def test_one_writer_and_readers_leave_one_vector_per_file_and_a_consistent_pin(
    tmp_path, two_models
):
    """Fails without the fixes of defects 1 and 6: a reader's stale manifest is written over
    the writer's (the pin reverts to the other model), or a read during a commit raises."""
    models = [str(m) for m in two_models]
    root = tmp_path / "photos"
    make_images(root, 6)
    query = make_images(tmp_path / "query", 1, seed=50)[0]
    ImageIndex.build(root, model=models[0], workers=0).close()
    ctx = multiprocessing.get_context("spawn")
    stop = tmp_path / "stop"
    readers = [
        ctx.Process(
            target=stress_roles.reader,
            args=(str(root), str(query), str(stop), str(tmp_path / f"reader{i}.json"), i),
            name=f"reader{i}",
        )
        for i in range(READERS)
    ]
    writer = ctx.Process(
        target=stress_roles.writer,
        args=(str(root), models, ROUNDS, 0, str(tmp_path / "writer.json")),
        name="writer",
    )
    with stress_roles.running([*readers, writer], stop):
        # Generous bounds: a round takes seconds, but a shared 2-core machine under load (load
        # average 14 measured) stretched one run to 7 minutes.
        writer.join(timeout=900)
        stop.touch()
        for p in readers:
            p.join(timeout=300)
    for p in [writer, *readers]:  # every one has ended here, killed if it had to be
        assert p.exitcode == 0, f"{p.name} ended with {p.exitcode} (< 0: killed by that signal)"

    result = json.loads((tmp_path / "writer.json").read_text())
    assert result["codes"] == [0] * ROUNDS
    for i in range(READERS):
        seen = json.loads((tmp_path / f"reader{i}.json").read_text())
        assert seen["errors"] == [] and seen["rounds"] >= 2, seen

    index = ImageIndex.open(root)
    on_disk = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("img_*")
        if ".mocoretrieval" not in p.parts
    )
    files = index.store.files()
    assert sorted(files) == on_disk
    assert all(r.vector_id is not None for r in files.values())  # one vector per file
    assert len(index) == len(on_disk) == len({r.vector_id for r in files.values()})
    # The pin is the last rebuild's model, and the stored vectors are its embeddings.
    last = ImageIndex.open(root, model=result["last_model"])
    assert index.manifest["encoder"]["weights_hash"] == last.encoder.weights_hash()
    for rel, hits in zip(on_disk, index.search_batch([root / p for p in on_disk], k=1)):
        assert Path(hits[0].path).relative_to(root).as_posix() == rel and hits[0].score > 0.999


# --- the guard: no run leaves its children behind ----------------------------------------------


def _stuck_children(tmp_path: Path, n: int = 2) -> list:
    ctx = multiprocessing.get_context("spawn")
    return [
        ctx.Process(target=stress_roles.stuck, args=(str(tmp_path / f"pid{i}"),)) for i in range(n)
    ]


def _wait_for(files: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(f.exists() for f in files)


def test_a_failed_assertion_kills_and_joins_every_child(tmp_path):
    """Fails before the guard: the test asserted on its first child's exit code and left the
    others (readers waiting for a stop file) running for good."""
    children = _stuck_children(tmp_path)
    with pytest.raises(AssertionError), stress_roles.running(children, tmp_path / "stop", 0.2):
        _wait_for([tmp_path / "pid0", tmp_path / "pid1"])
        raise AssertionError("a failed check in the middle of the run")
    assert [p.exitcode for p in children] == [-signal.SIGKILL] * 2  # SIGTERM ignored: killed


def test_sigterm_as_from_timeout_kills_and_joins_every_child(tmp_path):
    """Fails before the guard: SIGTERM (``timeout``) ended pytest at once, its children
    orphaned and searching on."""
    children = _stuck_children(tmp_path, 1)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stress_roles.running(children, tmp_path / "stop", 0.2):
        _wait_for([tmp_path / "pid0"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    assert not children[0].is_alive() and children[0].exitcode == -signal.SIGKILL
    assert signal.getsignal(signal.SIGTERM) == before


_PARENT = """
import multiprocessing, sys, time
from pathlib import Path
sys.path[:0] = [{here!r}, {tests!r}]
import stress_roles

if __name__ == "__main__":
    reader = multiprocessing.get_context("spawn").Process(
        target=stress_roles.reader, args=({root!r}, {query!r}, {stop!r}, {out!r}, 0)
    )
    reader.start()
    Path({pid!r}).write_text(str(reader.pid))
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _has_open(pid: int, name: str) -> bool:
    try:
        return any(os.readlink(f).endswith(name) for f in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_reader_dies_with_the_process_that_started_it(tmp_path, indexed):
    """Fails without the fix: after `kill -9` of the test process, a reader (waiting for a stop
    file that never comes) searched on, an orphan, for good."""
    query = make_images(tmp_path / "query", 1, seed=50)[0]
    pid_file = tmp_path / "pid"
    script = _PARENT.format(
        here=str(HERE),
        tests=str(HERE.parent),
        root=str(indexed),
        query=str(query),
        stop=str(tmp_path / "stop"),
        out=str(tmp_path / "out.json"),
        pid=str(pid_file),
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    reader = None
    try:
        _wait_for([pid_file])
        reader = int(pid_file.read_text())
        deadline = time.monotonic() + 120
        while not _has_open(reader, "index.db") and time.monotonic() < deadline:
            time.sleep(0.1)  # searching: past its imports, in its loop
        assert _has_open(reader, "index.db")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(reader) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(reader)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if reader is not None and _alive(reader):
            os.kill(reader, signal.SIGKILL)
