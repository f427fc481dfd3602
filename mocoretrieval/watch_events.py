"""What `watch` makes of file-system events: which ones matter, and when a batch is due.

Pure parts, without threads or an observer, so that tests drive them with made-up events and
a made-up clock:

- :func:`event_paths` turns one watchdog event into the paths it touches that can change the
  index (image files, ``.mocoretrievalignore`` files, folders created, deleted or moved), with
  the index's own folder left out: the update writing there must not wake the watch again;
- :class:`Debouncer` gathers those paths from the observer's thread and hands them over as one
  batch once no event came for ``quiet`` seconds, or ``max_wait`` after the first one (a long
  copy still gets indexed as it goes); its memory is bounded: past ``max_pending`` paths it
  keeps one flag, "something changed", instead of more paths;
- :func:`excluded` says whether the ignore rules leave a path out, so that a batch of events
  under ``@eaDir`` or an excluded folder costs no update.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .errors import IgnoreRuleError
from .ignore import IGNORE_FILE, IgnoreRules
from .walk import is_image_name

# A copy of a photo is a burst of events (create, writes, close) within a fraction of a second;
# one second of quiet ends most bursts while keeping a copied photo searchable within seconds
# (benchmarks/watch_latency.py). A steady stream (a large import) is batched every 10 s.
QUIET_S = 1.0
MAX_WAIT_S = 10.0
# Paths remembered per batch (~100 bytes each): past it, only "something changed" is kept.
MAX_PENDING = 10_000

# The watchdog event types that can change the index ("attrib" is a `touch` in recent
# watchdog; older ones call it "modified"). Others ("opened", "closed_no_write", a folder's
# "modified") come by the thousand while the update itself reads the images.
FILE_EVENTS = frozenset({"created", "deleted", "modified", "moved", "closed", "attrib"})
FOLDER_EVENTS = frozenset({"created", "deleted", "moved"})


class Change(NamedTuple):
    """One path an event touched, POSIX and relative to ``root``, the watched folder it lies in
    (empty: the one root the caller knows)."""

    path: str
    is_dir: bool
    root: str = ""


def _relative(path: str | bytes, root: str) -> str | None:
    """``path`` relative to ``root``, POSIX; None when it is the root or outside it."""
    path = os.fsdecode(path)
    if not path:
        return None
    rel = os.path.relpath(path, root)
    if rel == "." or rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        return None
    return rel.replace(os.sep, "/")


def event_paths(event: Any, root: str, index_dir: str | None = None) -> list[Change]:
    """The paths a watchdog event touches that can change the index.

    Args:
        event: a ``watchdog.events.FileSystemEvent`` (``event_type``, ``src_path``,
            ``dest_path``, ``is_directory``) or anything with those attributes.
        root: the watched folder, as it was given to the observer.
        index_dir: the index folder when it lies inside ``root`` (POSIX, relative to it):
            what happens there is the update's own writing.

    Returns:
        Both ends of a move; nothing for an event that cannot change the index (an image
        read, a folder's listing changed, a file that is no image nor an ignore file).
    """
    is_dir = bool(event.is_directory)
    if event.event_type not in (FOLDER_EVENTS if is_dir else FILE_EVENTS):
        return []
    ends = [event.src_path]
    if event.event_type == "moved":
        ends.append(getattr(event, "dest_path", ""))
    out = []
    for end in ends:
        rel = _relative(end, root)
        if rel is None:
            continue
        if index_dir is not None and (rel == index_dir or rel.startswith(index_dir + "/")):
            continue
        name = rel.rsplit("/", 1)[-1]
        if is_dir or name == IGNORE_FILE or is_image_name(name):
            out.append(Change(rel, is_dir, root))
    return out


def excluded(root: Path, change: Change, patterns: Sequence[str]) -> bool:
    """Whether the ignore rules (defaults, ``patterns``, ``.mocoretrievalignore`` files) leave
    ``change`` out, as the walk would: it or a folder above it is excluded.

    An ignore file itself counts as excluded only inside an excluded folder: changing one
    changes what the walk sees. A rule that cannot be read counts as not excluding: the
    update then says what is wrong with it.
    """
    try:
        rules = IgnoreRules.for_root(patterns)
        parts = change.path.split("/")
        for i in range(len(parts)):
            folder = "/".join(parts[:i])
            if folder and rules.match(folder, is_dir=True) is not None:
                return True
            if (root / folder / IGNORE_FILE).is_file():
                rules = rules.with_file(root, folder)
        if parts[-1] == IGNORE_FILE and not change.is_dir:
            return False
        return rules.match(change.path, change.is_dir) is not None
    except IgnoreRuleError:
        return False


def any_wanted(root: Path, changes: Iterable[Change], patterns: Sequence[str]) -> bool:
    """Whether the ignore rules leave any of ``changes`` in (the first one found will do: a
    batch of 10,000 new photos costs one check, not 10,000). A change is checked against its
    own root where it names one, else against ``root``."""
    return any(not excluded(Path(c.root) if c.root else root, c, patterns) for c in changes)


class Batch(NamedTuple):
    """What changed since the last batch.

    Attributes:
        changes: the paths the events touched (at most ``max_pending`` of them).
        everything: more changed than was kept, or the whole folder is to be looked at (the
            first update, a lost event queue): the update must run whatever ``changes`` hold.
    """

    changes: frozenset[Change]
    everything: bool


class Debouncer:
    """Gathers changes from any thread and says when they make a batch.

    Args:
        quiet: a batch is due once no change came for this long (seconds) ...
        max_wait: ... or this long after its first change, whichever comes first.
        max_pending: changes kept per batch; past it only :attr:`Batch.everything` is set.
        clock: monotonic seconds; tests pass a fake one.
    """

    def __init__(
        self,
        quiet: float = QUIET_S,
        max_wait: float = MAX_WAIT_S,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet, self.max_wait, self.max_pending = quiet, max_wait, max_pending
        self.clock = clock
        self._lock = threading.Lock()
        self._changes: set[Change] = set()
        self._everything = False
        self._first: float | None = None
        self._last: float | None = None
        self._not_before: float | None = None
        # Set on every change: the watch loop sleeps on it when nothing is pending.
        self.woken = threading.Event()

    def add(self, changes: Iterable[Change]) -> None:
        """Records changes (from the observer's thread)."""
        changes = list(changes)
        if not changes:
            return
        with self._lock:
            for change in changes:
                if len(self._changes) < self.max_pending:
                    self._changes.add(change)
                else:
                    self._everything = True
            self._touch()
        self.woken.set()

    def add_everything(self) -> None:
        """Asks for an update whatever changed (the first one, events that were lost)."""
        with self._lock:
            self._everything = True
            self._touch()
        self.woken.set()

    def _touch(self) -> None:
        now = self.clock()
        if self._first is None:
            self._first = now
        self._last = now

    @property
    def pending(self) -> bool:
        with self._lock:
            return self._first is not None

    def due_at(self) -> float | None:
        """When the pending changes make a batch (clock seconds); None if none are pending."""
        with self._lock:
            if self._first is None or self._last is None:
                return None
            due = min(self._last + self.quiet, self._first + self.max_wait)
            return due if self._not_before is None else max(due, self._not_before)

    def take(self) -> Batch | None:
        """The pending batch if it is due, emptying it; else None."""
        due = self.due_at()
        if due is None or due > self.clock():
            return None
        with self._lock:
            batch = Batch(frozenset(self._changes), self._everything)
            self._reset()  # under the same lock: a change added meanwhile is not lost
        return batch

    def clear(self) -> None:
        """Forgets what is pending."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._changes, self._everything = set(), False
        self._first = self._last = self._not_before = None
        self.woken.clear()

    def put_back(self, batch: Batch, delay: float) -> None:
        """Makes ``batch`` pending again, due no sooner than ``delay`` seconds from now (the
        index was locked by another writer: try again later, with what came meanwhile)."""
        self.add(batch.changes)
        with self._lock:
            self._everything = self._everything or batch.everything
            self._touch()
            self._not_before = self.clock() + delay
