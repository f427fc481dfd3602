"""`mocoretrieval watch`: which events count, debouncing, polling against the index's records,
the fallback when inotify runs out, the index lock, Ctrl-C, and two real runs on a folder.

Most tests drive :class:`Watcher.step` with made-up events and a made-up clock; the two real
runs (polling, and events) wait for a copied photo to become searchable, with a bound on the
wait that only a broken watch reaches (speed is benchmarks/watch_latency.py's business).
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time

import pytest
import torch
from factories import make_images, make_tiny_encoder
from watchdog import events as ev

from mocoretrieval import watch
from mocoretrieval.cli import main
from mocoretrieval.errors import IndexBusyError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import UpdateLock
from mocoretrieval.watch import Watcher, count_changes
from mocoretrieval.watch_events import Batch, Change, Debouncer, event_paths, excluded

BOUND_S = 60.0  # a generous bound on a real wait: reached only when the watch is broken


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return make_tiny_encoder()


@pytest.fixture
def library(tmp_path, encoder):
    """``(root, index)``: four images, not indexed yet (the watch's first step does it)."""
    root = tmp_path / "photos"
    make_images(root / "a", 4)
    index = ImageIndex.create(root, encoder)
    yield root, index
    index.close()


def _watcher(index, clock=None, **kwargs) -> Watcher:
    kwargs.setdefault("update_options", {"workers": 0})
    return Watcher(index, clock=clock or Clock(), rescan=None, **kwargs)


def _events(watcher: Watcher, *events) -> None:
    for event in events:
        watcher.debouncer.add(event_paths(event, str(watcher.root), ".mocoretrieval"))


def _first_step(watcher: Watcher) -> None:
    report = watcher.step()
    assert report is not None  # the first step updates whatever happened


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {BOUND_S} s")
        time.sleep(0.05)


# --- which events count -----------------------------------------------------------------------


def test_event_paths_keep_what_can_change_the_index(tmp_path):
    """Broken on purpose: dropping the index-folder check makes the update's own writes wake
    the watch (an endless loop of updates); keeping "opened" events does the same while the
    update reads the images; dropping the move's destination loses the moved file."""
    root = str(tmp_path)

    def paths(event) -> list[Change]:
        out = event_paths(event, root, ".mocoretrieval")
        assert all(c.root == root for c in out)  # each change names the root it lies in
        return [c._replace(root="") for c in out]

    assert paths(ev.FileCreatedEvent(f"{root}/a/x.JPG")) == [Change("a/x.JPG", False)]
    assert paths(ev.FileClosedEvent(f"{root}/x.heic")) == [Change("x.heic", False)]
    assert paths(ev.FileCreatedEvent(f"{root}/notes.txt")) == []  # no image
    assert paths(ev.FileOpenedEvent(f"{root}/x.jpg")) == []  # the update reading it
    assert paths(ev.FileClosedNoWriteEvent(f"{root}/x.jpg")) == []
    assert paths(ev.DirModifiedEvent(f"{root}/a")) == []  # its listing: the file events say it
    assert paths(ev.FileModifiedEvent(f"{root}/.mocoretrieval/index.db")) == []
    assert paths(ev.FileCreatedEvent(f"{root}/.mocoretrieval/x.jpg")) == []
    assert paths(ev.FileModifiedEvent(f"{root}/b/.mocoretrievalignore")) == [
        Change("b/.mocoretrievalignore", False)
    ]
    assert paths(ev.DirDeletedEvent(f"{root}/b")) == [Change("b", True)]
    assert paths(ev.FileMovedEvent(f"{root}/a/x.jpg", f"{root}/b/y.jpg")) == [
        Change("a/x.jpg", False),
        Change("b/y.jpg", False),
    ]
    assert paths(ev.FileMovedEvent(f"{root}/x.jpg.part", f"{root}/x.jpg")) == [
        Change("x.jpg", False)  # a download renamed into place
    ]
    assert paths(ev.FileCreatedEvent("/elsewhere/x.jpg")) == []


def test_excluded_follows_the_ignore_rules(tmp_path):
    """Broken on purpose: not reading the ignore files on the way down (trips/ counts), or
    matching the path alone, not its folders (raw/x.jpg counts): both fail here."""
    (tmp_path / "trips").mkdir()
    (tmp_path / ".mocoretrievalignore").write_text("trips/\n")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / ".mocoretrievalignore").write_text("*.png\n")
    patterns = ["raw/"]

    def out(path: str, is_dir: bool = False) -> bool:
        return excluded(tmp_path, Change(path, is_dir), patterns)

    assert out("@eaDir/x.jpg") and out("a/@eaDir/x.jpg") and out("x/.thumbnails", True)
    assert out("trips/a.jpg") and out("trips", True)
    assert out("raw/x.jpg") and out("raw/deep/x.jpg")
    assert out("ok/x.png") and not out("ok/x.jpg")
    assert not out("a.jpg") and not out("new", True)
    assert not out(".mocoretrievalignore")  # rules changed: the walk sees other files
    assert out("trips/.mocoretrievalignore")  # inside an excluded folder: never read


# --- debouncing -------------------------------------------------------------------------------


def test_debouncer_waits_for_quiet_and_caps_the_wait():
    """Broken on purpose: timing the quiet from the first change (a burst is cut in two) or
    dropping the cap (a steady stream never makes a batch): both fail here."""
    clock = Clock()
    d = Debouncer(quiet=1.0, max_wait=10.0, clock=clock)
    assert d.take() is None and d.due_at() is None
    d.add([Change("a.jpg", False)])
    clock.t += 0.8
    d.add([Change("b.jpg", False)])
    clock.t += 0.8  # 1.6 s after the first, 0.8 after the last: still within the burst
    assert d.take() is None
    clock.t += 0.3
    batch = d.take()
    assert batch == Batch(frozenset({Change("a.jpg", False), Change("b.jpg", False)}), False)
    assert d.take() is None and not d.pending
    start = clock.t
    while (batch := d.take()) is None:  # a change every half second, for ever
        d.add([Change(f"{clock.t}.jpg", False)])
        clock.t += 0.5
        assert clock.t - start < 11
    assert clock.t - start == pytest.approx(10.0, abs=0.5)


def test_debouncer_memory_is_bounded():
    """Broken on purpose: no cap on the pending set: 1000 changes kept, not 10."""
    d = Debouncer(quiet=0.0, max_pending=10, clock=Clock())
    d.add(Change(f"{i}.jpg", False) for i in range(1000))
    batch = d.take()
    assert len(batch.changes) == 10 and batch.everything


def test_put_back_waits_and_keeps_what_came_meanwhile():
    """Broken on purpose: `put_back` ignoring its delay: the retry comes at once."""
    clock = Clock()
    d = Debouncer(quiet=1.0, clock=clock)
    d.add([Change("a.jpg", False)])
    clock.t += 1
    batch = d.take()
    d.add([Change("b.jpg", False)])
    d.put_back(batch, delay=5.0)
    clock.t += 2
    assert d.take() is None  # not before the delay
    clock.t += 3
    assert {c.path for c in d.take().changes} == {"a.jpg", "b.jpg"}


# --- the watcher, step by step ------------------------------------------------------------------


def test_add_move_delete_and_excluded_events(library, monkeypatch):
    """Broken on purpose: `step` updating for batches the ignore rules exclude (one update too
    many), or an update missing a deletion or a move, fail here."""
    root, index = library
    clock = Clock()
    w = _watcher(index, clock)
    _first_step(w)
    assert len(index.paths()) == 4
    shutil.copy(root / "a" / "img_0000.jpg", root / "new.jpg")
    _events(w, ev.FileCreatedEvent(str(root / "new.jpg")))
    assert w.step() is None  # not quiet for a second yet
    clock.t += 1.5
    report = w.step()
    assert report.added == ["new.jpg"]
    (root / "a" / "img_0001.png").rename(root / "moved.png")
    (root / "a" / "img_0002.jpg").unlink()
    _events(
        w,
        ev.FileMovedEvent(str(root / "a" / "img_0001.png"), str(root / "moved.png")),
        ev.FileDeletedEvent(str(root / "a" / "img_0002.jpg")),
    )
    clock.t += 1.5
    report = w.step()
    assert sorted(report.removed) == ["a/img_0001.png", "a/img_0002.jpg"]
    assert report.added == ["moved.png"]
    assert sorted(index.paths()) == ["a/img_0000.jpg", "a/img_0003.png", "moved.png", "new.jpg"]
    calls = []
    monkeypatch.setattr(index, "update", lambda **kw: calls.append(kw))
    (root / "@eaDir").mkdir()
    shutil.copy(root / "new.jpg", root / "@eaDir" / "thumb.jpg")
    _events(w, ev.FileCreatedEvent(str(root / "@eaDir" / "thumb.jpg")))
    clock.t += 1.5
    assert w.step() is None and calls == []  # a NAS thumbnail: no update


def test_a_locked_index_is_retried_not_lost(library):
    """While another writer (an `index` run) holds the lock, the batch waits and is tried
    again. Broken on purpose: `_update` not putting the batch back: the copied file is never
    indexed and this fails."""
    root, index = library
    clock = Clock()
    w = _watcher(index, clock)
    _first_step(w)
    shutil.copy(root / "a" / "img_0000.jpg", root / "new.jpg")
    _events(w, ev.FileCreatedEvent(str(root / "new.jpg")))
    clock.t += 1.5
    with UpdateLock(index.path):
        assert w.step() is None
    assert "new.jpg" not in index
    clock.t += 1.0
    assert w.step() is None  # the retry waits 2 s
    clock.t += 1.5
    assert w.step().added == ["new.jpg"]


def test_ctrl_c_mid_update_leaves_the_index_consistent_and_unlocked(library):
    """Ctrl-C after the first committed batch of an update: those images stay indexed, both
    locks are free, and the next watch finishes the job. Broken on purpose: `close` not
    releasing watch.lock makes the second watch refuse to start."""
    _, index = library

    def interrupt(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    options = {"workers": 0, "batch_size": 2, "progress": interrupt}
    with pytest.raises(KeyboardInterrupt), _watcher(index, update_options=options) as w:
        w.run()
    assert w._observer is None  # stopped
    assert len(index.paths()) == 2  # the committed batch
    with UpdateLock(index.path):  # free
        pass
    with _watcher(index) as again:
        assert again.step().added and len(index.paths()) == 4


def test_one_watch_per_index(library):
    """Broken on purpose: `start` without watch.lock: the second watch starts."""
    _, index = library
    busy = pytest.raises(IndexBusyError, match="another `mocoretrieval watch`")
    with _watcher(index, polling=True), busy:
        _watcher(index, polling=True).start()


# --- polling and the fallback to it -------------------------------------------------------------


def test_count_changes_agrees_with_the_update(library):
    """Polling compares the folder with the index's records. Broken on purpose: counting the
    files an update keeps (an emptied folder: an unmounted drive) makes every poll update for
    ever; not counting deletions makes a poll miss them."""
    root, index = library
    index.update(workers=0)
    assert count_changes(index) == 0
    shutil.copy(root / "a" / "img_0000.jpg", root / "new.jpg")
    (root / "a" / "img_0001.png").unlink()
    assert count_changes(index) == 2
    index.update(workers=0)
    assert count_changes(index) == 0
    mount = root / "a"
    for p in mount.iterdir():
        p.unlink()  # what an unmounted drive's mount point looks like
    report = index.update(workers=0)
    assert report.empty == {"a": 3} and count_changes(index) == 0
    (root / ".mocoretrievalignore").write_text("new.jpg\n")
    assert count_changes(index) == 1  # now excluded: removed by the next update


def test_polling_updates_only_when_something_changed(library, monkeypatch):
    root, index = library
    clock = Clock()
    w = _watcher(index, clock, polling=True, interval=5.0)
    _first_step(w)
    real, calls = index.update, []
    monkeypatch.setattr(index, "update", lambda **kw: calls.append(1) or real(**kw))
    clock.t += 5
    assert w.step() is None and calls == []  # nothing changed: no update, no write
    shutil.copy(root / "a" / "img_0000.jpg", root / "new.jpg")
    clock.t += 2
    assert w.step() is None  # not time yet
    clock.t += 3
    assert w.step().added == ["new.jpg"] and calls == [1]


class _NoWatchesObserver:
    """An observer whose start fails as inotify's does when its watch limit is reached."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.err = err

    def schedule(self, *args, **kwargs):
        return None

    def start(self):
        raise OSError(self.err, "inotify watch limit reached")

    def stop(self):
        pass

    def is_alive(self):
        return False


def test_inotify_limits_fall_back_to_polling_and_say_how_to_raise_them(library, caplog):
    """Broken on purpose: not catching the observer's OSError: `start` raises and this fails."""
    _, index = library
    with caplog.at_level(logging.WARNING, logger="mocoretrieval.watch"):
        with _watcher(index, observer_factory=_NoWatchesObserver) as w:
            assert w.mode == "polling"
        assert "fs.inotify.max_user_watches" in caplog.text and "polling" in caplog.text
        caplog.clear()
        with _watcher(index, observer_factory=lambda: _NoWatchesObserver(errno.EMFILE)) as w:
            assert w.mode == "polling"
        assert "fs.inotify.max_user_instances" in caplog.text


def test_folders_left_unwatched_fall_back_to_polling(library, monkeypatch, caplog):
    """Recent watchdog skips the folders it cannot watch, silently. Broken on purpose: no
    `_check_watches` after start: the watch stays in event mode, blind to those folders; and
    `_fall_back` keeping the pending events (a batch polling never takes)."""
    root, index = library
    monkeypatch.setattr(watch, "inotify_watches", lambda: 1)
    w = _watcher(index)
    _events(w, ev.FileCreatedEvent(str(root / "x.jpg")))
    with caplog.at_level(logging.WARNING, logger="mocoretrieval.watch"), w:
        assert w.mode == "polling" and w._observer is None
        assert not w.debouncer.pending  # else `run` would spin on a batch polling never takes
    assert "watches only 1 of the" in caplog.text


# --- real runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("polling", [True, False], ids=["polling", "events"])
def test_a_copied_photo_becomes_searchable(library, polling):
    """A real watch on a real folder, in a thread: a photo copied in is found by a search,
    one deleted is gone. Broken on purpose: `run` never calling `step` fails both."""
    root, index = library
    w = Watcher(index, polling=polling, interval=0.2, quiet=0.2, update_options={"workers": 0})
    with w:
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        try:
            _wait_for(lambda: len(index.paths()) == 4, "the first update")
            photo = root / "b" / "new.jpg"
            photo.parent.mkdir()
            shutil.copy(root / "a" / "img_0000.jpg", photo)
            searcher = ImageIndex.open(index.path, model=index.encoder)

            def found() -> bool:
                return "b/new.jpg" in [r.relpath for r in searcher.search(photo, k=5)]

            _wait_for(found, "finding the copied photo")
            shutil.rmtree(root / "b")
            _wait_for(lambda: "b/new.jpg" not in searcher, "forgetting the deleted photo")
            searcher.close()
        finally:
            w.stop()
            thread.join(timeout=BOUND_S)
    assert not thread.is_alive()


def test_every_root_of_a_library_is_watched(tmp_path, encoder):
    """A library of two roots: a photo copied into the second root (the one the index does not
    live in) is found, by events. Broken on purpose: scheduling the observer on the first root
    only (as before several roots) fails (the watch-count check falls back to polling); a change checked
    against the first root's ignore files instead of its own is excluded there (checked by
    `any_wanted` ignoring ``Change.root``)."""
    photos, nas = tmp_path / "photos", tmp_path / "nas"
    make_images(photos / "a", 2)
    make_images(nas / "a", 2, seed=1)
    (photos / ".mocoretrievalignore").write_text("new/\n")  # the first root's rule only
    index = ImageIndex.create([photos, nas], encoder, tmp_path / "library")
    w = Watcher(index, interval=0.2, quiet=0.2, rescan=None, update_options={"workers": 0})
    with w:
        assert w.mode == "events" and w.where == f"{photos}, {nas}"
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        try:
            _wait_for(lambda: len(index.paths()) == 4, "the first update")
            photo = nas / "new" / "copy.jpg"
            photo.parent.mkdir()
            shutil.copy(photos / "a" / "img_0000.jpg", photo)
            _wait_for(lambda: "nas/new/copy.jpg" in index.paths(), "indexing the copied photo")
        finally:
            w.stop()
            thread.join(timeout=BOUND_S)
    index.close()
    assert not thread.is_alive()


def test_cli_watch_stops_on_ctrl_c_with_status_0(library, monkeypatch, capsys, tmp_path):
    """Broken on purpose: `_cmd_watch` not catching KeyboardInterrupt: main returns 130."""
    root, index = library
    encoder_dir = tmp_path / "encoder"
    index.encoder.save_pretrained(encoder_dir)
    index.close()
    shutil.rmtree(root / ".mocoretrieval")
    assert main(["index", str(root), "--model", str(encoder_dir), "--backend", "torch", "-q"]) == 0
    shutil.copy(root / "a" / "img_0000.jpg", root / "new.jpg")

    def run(self) -> None:
        self.step()  # the first update
        raise KeyboardInterrupt

    monkeypatch.setattr(Watcher, "run", run)
    capsys.readouterr()
    assert main(["watch", str(root), "--backend", "torch", "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "watching" in out and "added 1" in out and "stopped watching" in err
    with UpdateLock(root / ".mocoretrieval"):  # released
        pass
