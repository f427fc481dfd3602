"""`mocoretrieval watch`: keeps an index current while its folder changes.

File-system events (watchdog: inotify on Linux, FSEvents on macOS...) feed a
:class:`~mocoretrieval.watch_events.Debouncer`; each batch it hands over that the ignore rules
do not leave out runs the index's own incremental :meth:`~mocoretrieval.index.ImageIndex.update`
over the root. That update already embeds only new and changed files (an unchanged one costs a
``stat``), removes deleted ones (a move is a removal and an addition), follows the ignore
rules, keeps what an unmounted drive held, and commits batch by batch; a second way of doing
all that, path by path, would have to agree with it forever (benchmarks/watch_latency.py
measures what the whole-root walk costs).

Polling — asked for, or on its own when events cannot be had (inotify's watch or instance
limit reached, an observer that died) — compares the folder with the index's own stat records
every ``interval`` seconds (:func:`.library_walk.count_changes`) and updates when they differ.
Nothing is kept between two polls; watchdog's ``PollingObserver`` would hold a stat of every file. Polls
stretch to ten times the walk they take, so a huge tree is not walked without rest. In event
mode the same comparison runs every ``rescan`` seconds: it catches what events miss (a network
share changed by another machine, an event queue that overflowed).

Memory is bounded whatever the tree: the pending changes (at most
:data:`~mocoretrieval.watch_events.MAX_PENDING`), a kernel watch per folder, and what an update
holds while it runs. Each update takes the index lock for its own duration only, so `index`,
`undo` and `duplicates --trash` run between batches, and a batch that finds the lock taken is
tried again a little later; ``watch.lock`` keeps a second watch of the same index away.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IgnoreRuleError, IndexBusyError
from .layout import UpdateLock
from .library_walk import count_changes
from .update import UpdateReport
from .watch_events import MAX_WAIT_S, QUIET_S, Batch, Debouncer, any_wanted, event_paths

if TYPE_CHECKING:
    from typing_extensions import Self

    from .index import ImageIndex

log = logging.getLogger(__name__)

WATCH_LOCK = "watch.lock"  # in the index folder, held while a watch runs
POLL_INTERVAL_S = 5.0
RESCAN_S = 600.0  # event mode's safety net: a full comparison every 10 minutes
RETRY_S = 2.0  # the index is locked by another writer: try again after this long
WATCHES_HELP = (
    "raise the limit with `sudo sysctl fs.inotify.max_user_watches=524288` (and keep it with "
    "`echo fs.inotify.max_user_watches=524288 | sudo tee /etc/sysctl.d/90-inotify.conf`)"
)
INSTANCES_HELP = (
    "raise the limit with `sudo sysctl fs.inotify.max_user_instances=1024` (and keep it in "
    "/etc/sysctl.d/90-inotify.conf)"
)


def inotify_watches() -> int | None:
    """The inotify watches this process holds (Linux), or None where that cannot be read."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    total = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def count_folders(root: Path) -> int:
    """The folders a recursive watch of ``root`` needs: it and every folder below, hidden and
    excluded ones too (the observer watches them all), symlinked ones not."""
    n = 1
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        n += len(dirnames)
    return n


def _limit_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"inotify's watch limit is reached ({e}); {WATCHES_HELP}"
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return f"inotify's instance limit is reached ({e}); {INSTANCES_HELP}"
    return f"cannot watch for events ({e.strerror or e})"


class _WatchLock(UpdateLock):
    """The index lock's mechanism on ``watch.lock``: one watch per index."""

    def __init__(self, index_dir: Path) -> None:
        super().__init__(index_dir)
        self.file = index_dir / WATCH_LOCK


class _Handler:
    """The observer's event handler (its thread calls ``dispatch``): events to changes."""

    def __init__(self, debouncer: Debouncer, root: str, index_dir: str | None) -> None:
        self.debouncer, self.root, self.index_dir = debouncer, root, index_dir

    def dispatch(self, event: Any) -> None:
        self.debouncer.add(event_paths(event, self.root, self.index_dir))


class Watcher:
    """Keeps one index current: events (or polls) in, debounced updates out.

    Use it as a context manager, then :meth:`run` (blocks until :meth:`stop` or Ctrl-C), or
    drive it with :meth:`step` (what tests do, with a fake clock). The first step updates the
    index whatever happened, as `mocoretrieval index` would.

    Args:
        index: an index opened for updating (:func:`mocoretrieval.open_index` with ``root``).
        exclude: ``--exclude`` patterns for the first update (None: the index's); kept in the
            index from then on, as by `index`.
        polling: poll instead of watching for events.
        interval: seconds between polls (at least ten times the last poll's walk).
        quiet, max_wait: see :class:`~mocoretrieval.watch_events.Debouncer`.
        rescan: seconds between the full comparisons of event mode (None: never).
        retry: seconds before a batch refused for the index lock is tried again.
        update_options: passed to each update (``batch_size``, ``workers``, ``device``).
        on_update: called with each update's report.
        observer_factory: makes the watchdog observer (default: the platform's own).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        index: ImageIndex,
        *,
        exclude: list[str] | None = None,
        polling: bool = False,
        interval: float = POLL_INTERVAL_S,
        quiet: float = QUIET_S,
        max_wait: float = MAX_WAIT_S,
        rescan: float | None = RESCAN_S,
        retry: float = RETRY_S,
        update_options: dict[str, Any] | None = None,
        on_update: Callable[[UpdateReport], None] | None = None,
        observer_factory: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.roots = [Path(r.path) for r in index.roots]  # every root of the library
        self.root = self.roots[0]
        self.mode = "polling" if polling else "events"
        self.interval, self.rescan, self.retry = interval, rescan, retry
        self.update_options = dict(update_options or {})
        self.on_update = on_update
        self.clock = clock
        self.debouncer = Debouncer(quiet, max_wait, clock=clock)
        self._exclude = exclude
        self._observer_factory = observer_factory
        self._observer: Any = None
        self._lock: _WatchLock | None = None
        self._stopping = threading.Event()
        self._last_walk = 0.0  # seconds the last comparison's walk took
        now = clock()
        self._full_due: float | None = now  # the first update, at once
        self._next_poll = now + interval
        self._next_rescan = None if rescan is None else now + rescan

    # --- starting and stopping -----------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Takes ``watch.lock`` and starts watching (events, or polling when they cannot be
        had: then a warning says why).

        Raises:
            IndexBusyError: another watch runs on this index.
        """
        lock = _WatchLock(self.index.path)
        try:
            lock.__enter__()
        except IndexBusyError:
            raise IndexBusyError(
                f"another `mocoretrieval watch` is watching the index at {self.index.path}; "
                "one is enough (stop it first to start this one)"
            ) from None
        self._lock = lock
        if self.mode == "events":
            self._start_observer()

    def _start_observer(self) -> None:
        try:
            from watchdog.observers import Observer
        except ImportError:
            self._fall_back("watchdog is not installed (`pip install watchdog`)")
            return
        observer = (self._observer_factory or Observer)()
        try:
            # One handler per root that is there: an offline root's return is seen by the
            # rescan, which compares the whole library.
            for root in self._present_roots():
                index_dir = os.path.relpath(
                    os.path.realpath(self.index.path), os.path.realpath(root)
                )
                inside = None if index_dir.startswith("..") else index_dir.replace(os.sep, "/")
                handler = _Handler(self.debouncer, str(root), inside)
                try:  # only the events that can change the index, where watchdog can filter
                    observer.schedule(handler, str(root), recursive=True, event_filter=_filter())
                except TypeError:  # watchdog < 4
                    observer.schedule(handler, str(root), recursive=True)
            observer.start()
        except OSError as e:
            _stop(observer)
            self._fall_back(_limit_reason(e))
            return
        self._observer = observer
        if self._observer_factory is None:
            self._check_watches()

    def _check_watches(self) -> None:
        """Falls back to polling when inotify watches fewer folders than the tree has: recent
        watchdog skips the folders it could not watch instead of raising."""
        watches = inotify_watches()
        if watches is None or self._observer is None:
            return
        folders = sum(count_folders(root) for root in self._present_roots())
        if watches < folders:
            self._fall_back(
                f"inotify watches only {watches} of the {folders} folders of {self.where} "
                f"(fs.inotify.max_user_watches is reached); {WATCHES_HELP}"
            )

    @property
    def where(self) -> str:
        """The watched folders, for messages."""
        return ", ".join(str(root) for root in self.roots)

    def _present_roots(self) -> list[Path]:
        return [root for root in self.roots if root.is_dir()]

    def _fall_back(self, reason: str) -> None:
        _stop(self._observer)
        self._observer = None
        self.mode = "polling"
        self.debouncer.clear()  # polling takes no batches: the poll below covers them
        self._next_poll = self.clock()  # events may have been missed: look now
        log.warning(
            "%s: watching %s by polling every %g s instead", reason, self.where, self.interval
        )

    def stop(self) -> None:
        """Makes :meth:`run` return (from another thread, or a signal handler)."""
        self._stopping.set()
        self.debouncer.woken.set()

    def close(self) -> None:
        """Stops the observer and releases ``watch.lock``; the index is left as the last
        committed batch left it (an update interrupted by Ctrl-C keeps its batches)."""
        _stop(self._observer)
        self._observer = None
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Steps until :meth:`stop` (or a KeyboardInterrupt, which propagates)."""
        while not self._stopping.is_set():
            self.step()
            due = self._next_due()
            wait = 1.0 if due is None else min(1.0, max(0.01, due - self.clock()))
            if self.debouncer.pending:
                self._stopping.wait(wait)
            else:  # an event wakes the loop early
                self.debouncer.woken.wait(wait)

    def _next_due(self) -> float | None:
        times = [self.debouncer.due_at(), self._full_due]
        times.append(self._next_poll if self.mode == "polling" else self._next_rescan)
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def step(self) -> UpdateReport | None:
        """Does what is due now: the first update, a poll or rescan, a batch of events.

        Returns:
            The report of the update run, if one ran.
        """
        observer = self._observer
        if observer is not None and not _alive(observer):
            self._fall_back("the file-system observer stopped")
        now = self.clock()
        if self._full_due is not None and now >= self._full_due:
            return self._update(None)
        if self.mode == "polling":
            if now < self._next_poll:
                return None
            changed = self._compare()
            self._next_poll = self.clock() + max(self.interval, 10 * self._last_walk)
            return self._update(None) if changed else None
        batch = self.debouncer.take()
        if batch is not None:
            patterns = self._patterns()
            if batch.everything or any_wanted(self.root, batch.changes, patterns):
                return self._update(batch)
            log.debug("%d changes, all excluded: no update", len(batch.changes))
        if self._next_rescan is not None and now >= self._next_rescan:
            changed = self._compare()
            self._next_rescan = self.clock() + max(self.rescan or 0.0, 10 * self._last_walk)
            if changed:
                log.info("the rescan found %d changes that no event announced", changed)
                self._check_watches()
                return self._update(None)
        return None

    def _compare(self) -> int:
        t0 = self.clock()
        try:
            return count_changes(self.index)
        except IgnoreRuleError:
            return 1  # the update says what is wrong with the rule
        finally:
            self._last_walk = self.clock() - t0

    def _patterns(self) -> list[str]:
        if self._exclude is not None:
            return list(self._exclude)
        return list(self.index.manifest.get("exclude", []))

    def _update(self, batch: Batch | None) -> UpdateReport | None:
        """One update of the whole root for ``batch`` (None: a full one asked for)."""
        self._full_due = None
        try:
            report = self.index.update(exclude=self._exclude, **self.update_options)
        except IndexBusyError:
            log.info("another writer holds the index lock; trying again in %g s", self.retry)
            if batch is None:
                self._full_due = self.clock() + self.retry
            else:
                self.debouncer.put_back(batch, self.retry)
            return None
        except IgnoreRuleError as e:  # a broken ignore file: fixing it is the next event
            log.error("%s; the index is unchanged until it is fixed", e)
            return None
        self._exclude = None  # kept in the index from now on
        if self.on_update is not None:
            self.on_update(report)
        return report


def _filter() -> list[type]:
    """The watchdog event classes :func:`~mocoretrieval.watch_events.event_paths` keeps."""
    from watchdog import events as ev

    names = (
        "FileCreatedEvent FileDeletedEvent FileModifiedEvent FileMovedEvent FileClosedEvent "
        "FileAttribEvent DirCreatedEvent DirDeletedEvent DirMovedEvent"
    )
    return [getattr(ev, name) for name in names.split() if hasattr(ev, name)]


def _alive(observer: Any) -> bool:
    emitters = getattr(observer, "emitters", ())
    return observer.is_alive() and all(e.is_alive() for e in emitters)


def _stop(observer: Any) -> None:
    if observer is None:
        return
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except (OSError, RuntimeError) as e:  # already stopped, or never started
        log.debug("stopping the observer: %s", e)
