"""Bringing an index in line with its folder: the walk, the diff, the embedding, the commits.

`ImageIndex` takes its ``update`` from :class:`Updating`; only this code writes to an index
directory, always under its lock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import ann, embed
from .duplicates import pairs_of
from .embedder import Embedder
from .errors import MoCoRetrievalError
from .faiss_file import FaissFile
from .ignore import count_excluded, excluding_rule
from .layout import DATABASE, UpdateLock, now
from .library_walk import (
    OFFLINE_EMPTY,
    LibraryScan,
    folder_key,
    held_by_root,
    held_in_empty,
    iter_library_embeddings,
    offline_keys,
    scan_library,
)
from .pathsafety import display, under
from .roots import Roots
from .store import FileStat, Store

log = logging.getLogger(__name__)

# How ``update`` can have its files embedded elsewhere (see its ``embed_step`` argument).
EmbedStep = Callable[..., None]


@dataclass
class UpdateReport:
    """What one :meth:`ImageIndex.update` did. Paths are keys: relative to the root (in a
    library of several roots, with the root's name in front; see :mod:`mocoretrieval.roots`).

    ``seconds`` is the whole update (walk, model, commits, FAISS rebuild) and ``images_per_s``
    the files embedded or skipped per second of it: end to end, as a user waits for it.
    """

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths
    # Folders that could not be listed (unmounted, no permission): folder -> reason. What the
    # index holds under them is kept, not counted as deleted.
    unreadable: dict[str, str] = field(default_factory=dict)
    # Folders that list nothing while the index holds files under them (the mount point of an
    # unmounted drive; "." for the root of a one-root index, a root's name for a whole root,
    # also in ``offline``): folder -> files kept. ``prune_empty`` removes them.
    empty: dict[str, int] = field(default_factory=dict)
    # What the ignore rules left out: source -> pattern -> {"files": n, "folders": n}, image
    # files and the folders not entered (see :func:`.ignore.count_excluded`).
    excluded: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # The files of ``removed`` that the ignore rules now exclude (the rules changed, or an
    # ignore file was added): removed from the index as if deleted; the files are not touched.
    excluded_removed: list[str] = field(default_factory=list)
    # Roots not walked because their folder is missing, or empty while the index holds files of
    # it (see :mod:`mocoretrieval.library_walk`): root folder -> (why, files kept).
    offline: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Roots added by this update (``index ROOT --index DIR`` with a new ROOT).
    added_roots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def num_excluded(self) -> tuple[int, int]:
        """``(image files, folders)`` the ignore rules left out."""
        counts = [c for patterns in self.excluded.values() for c in patterns.values()]
        return sum(c["files"] for c in counts), sum(c["folders"] for c in counts)


class Updating:
    """The writing half of `ImageIndex`: :meth:`update` and what only it calls, and the other
    writers (:meth:`mark_not_duplicates`, :meth:`forget`), each under the lock."""

    # Set by ImageIndex.__init__.
    path: Path
    roots: Roots
    dim: int
    store: Store
    faiss: FaissFile
    manifest: dict[str, Any]
    last_report: UpdateReport | None
    _device: str | None
    _encoder: Embedder | None
    _pending_reset: tuple[Embedder, str | None] | None
    _pending_index_type: str | None
    _pending_store_dtype: str | None

    # ImageIndex's: the model (loaded when first needed), reloading a manifest another process
    # replaced, writing it (under the lock), and the manifest's entry for an encoder.
    encoder: Embedder
    _sync: Callable[[], None]
    _apply_roots: Callable[[], list[str]]
    _save_manifest: Callable[[], None]
    _encoder_entry: Callable[[Embedder, str | None], dict[str, Any]]
    relative: Callable[[str | os.PathLike], str]

    def update(
        self,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        device: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        prune_empty: bool = False,
        exclude: Sequence[str] | None = None,
        embed_step: EmbedStep | None = None,
    ) -> UpdateReport:
        """Brings the index in line with the folder: embeds new and changed files (by size and
        mtime), forgets deleted ones, and leaves the rest alone.

        Every root of the library is walked. A root whose folder is missing, or lists nothing
        while the index holds files of it, is offline: its files are kept and reported in
        ``offline``. Files under a folder that cannot be listed, or that lists nothing at all
        (what the mount point of an unmounted drive looks like), are kept and reported in
        ``unreadable`` and ``empty``: they are out of reach, maybe not deleted. A folder deleted
        with its files is a deletion like any other.

        Files the ignore rules exclude (see :mod:`mocoretrieval.ignore`) are not indexed, and
        an indexed file they now exclude is removed, as if deleted, and listed in
        ``excluded_removed`` as well; excluded folders are not entered.

        Each batch is committed as it is embedded, so an interrupted update keeps its work and
        the next one continues from there. An unchanged folder costs a walk and no model work.

        Args:
            batch_size: images per forward pass (and per commit); None picks one for the
                model and device (see :func:`mocoretrieval.embed.default_batch_size`).
            workers: decoding processes; None picks, 0 decodes in this process.
            device: torch device; None picks CUDA when available, else CPU.
            progress: called as ``progress(done, total)`` after each batch of files to embed.
            prune_empty: forget the files of folders that list nothing as well (they were
                really deleted, not unmounted), an empty root's too; a root whose folder is
                missing is kept all the same (remove it with :meth:`remove_root`).
            exclude: gitignore patterns, relative to each root, to leave out; kept in the
                manifest for the next updates. None keeps the index's; ``[]`` drops them.
            embed_step: embeds the files to embed instead of this process; called (also with
                none) as ``embed_step(index, todo, stats, known, report, progress)`` under the
                lock, e.g. a :class:`~mocoretrieval.sharded_embedding.ShardedEmbedding` that
                shares them among torchrun's ranks. None embeds them here.

        Raises:
            IgnoreRuleError: a pattern is malformed or an ignore file unreadable; nothing is
                changed.
        """
        t0 = time.perf_counter()
        report = UpdateReport()
        with UpdateLock(self.path):
            self._sync()  # the manifest as the last writer left it, not as this one read it
            self._writable()
            report.added_roots = self._apply_roots()  # the table made or migrated, new roots in
            patterns = list(self.manifest.get("exclude", []) if exclude is None else exclude)
            known = self.store.files()
            # The walk first: a malformed pattern, like a bad index type, changes nothing.
            scan = self._walk(patterns, known, prune_empty)
            stats, problems, report.unreadable = scan.stats, scan.problems, scan.unreadable
            excluded = scan.excluded
            kept_offline = offline_keys(self.roots, scan.offline, known)
            for root in self.roots:
                if root.name in scan.offline:
                    n = len(self.roots.keys_of(root, kept_offline))
                    report.offline[str(root.path)] = (scan.offline[root.name], n)
                    if n and scan.offline[root.name] == OFFLINE_EMPTY:  # as before roots
                        report.empty[folder_key(root, ".")] = n
                    log.warning(
                        "root %s is offline (%s): %d files kept",
                        root.path,
                        *report.offline[str(root.path)],
                    )
            requested = self._pending_index_type
            if requested is not None:  # before any model work: fail fast, change nothing
                ann.check_buildable(
                    requested,
                    len(stats),
                    int(self._pending_reset[0].dim) if self._pending_reset else self.dim,
                )
            if self._pending_reset is not None:
                self._reset(*self._pending_reset)
                self._pending_reset = None
                known = self.store.files()  # nothing: every file is embedded again
            report.excluded = count_excluded(excluded)
            if patterns != self.manifest.get("exclude", []):
                # Kept before the removals they cause: an interrupted run keeps the new rules.
                self.manifest["exclude"] = patterns
                self._save_manifest()
            gone = sorted(
                p
                for p in set(known) - set(stats) - set(problems) - kept_offline
                if not under(p, report.unreadable)
            )
            report.excluded_removed = [p for p in gone if excluding_rule(p, excluded)]
            now_excluded = set(report.excluded_removed)
            held = (
                {}
                if prune_empty
                else held_in_empty(
                    self.roots, [p for p in gone if p not in now_excluded], self.path
                )
            )
            kept = {p for paths in held.values() for p in paths}
            report.removed = [p for p in gone if p not in kept]
            for folder, paths in held.items():
                report.empty[display(folder)] = len(paths)
                log.warning("%s lists nothing but held %d indexed files: kept", folder, len(paths))
            self.store.remove(report.removed)
            if report.removed:
                self.store.vacuum_if_sparse()
            self._record_problems(problems, known, report)
            todo = [p for p, st in stats.items() if p not in known or known[p][:2] != tuple(st)]
            if embed_step is not None:
                embed_step(self, todo, stats, known, report, progress)
            elif todo:
                done = 0
                if progress is not None:
                    progress(0, len(todo))  # the bar appears before the model loads
                batches = iter_library_embeddings(
                    self.encoder,
                    scan.where,
                    todo,
                    batch_size=batch_size,
                    workers=workers,
                    device=device or self._device,
                )
                try:
                    for batch in batches:
                        batch.drop_non_finite()
                        skipped = [(p, reason, stats[p]) for p, reason in batch.skipped]
                        self.store.add_batch(
                            batch.paths,
                            batch.vectors,
                            [stats[p] for p in batch.paths],
                            skipped,
                            thumbnails=batch.thumbnails,
                            frames=batch.frames,
                        )
                        for p in batch.files:
                            (report.updated if p in known else report.added).append(p)
                        for p, reason in batch.skipped:
                            report.skipped.setdefault(reason, []).append(p)
                        done += len(batch)
                        if progress is not None:
                            progress(done, len(todo))
                except RuntimeError as e:
                    # iter_embeddings recovers from its own dead workers and keeps them off
                    # torch's SIGCHLD handler; a DataLoader of the caller's, still registered
                    # there, can have a death reported here, between batches.
                    embed.raise_if_worker_died(e, done)
                    raise
            previous = self.manifest["index_type"]
            if requested is not None:
                self.manifest["index_type"] = requested
            try:
                self.faiss.refresh(save=True)  # saves the manifest only once the index is built
            except MoCoRetrievalError as e:
                self.manifest["index_type"] = previous  # a type FAISS cannot build is not kept
                raise MoCoRetrievalError(
                    f"{e}. The index keeps {previous!r}; the embeddings done are saved"
                ) from e
            self._pending_index_type = None
            self.manifest["last_update"] = now()
            self.manifest["excluded"] = report.excluded
            self._save_manifest()
        report.seconds = time.perf_counter() - t0
        n = len(report.added) + len(report.updated) + report.num_skipped
        report.images_per_s = n / report.seconds if n else 0.0
        self.last_report = report
        log.info(
            "update: %d added, %d updated, %d removed (%d of them now excluded), %d skipped, "
            "%d files and %d folders excluded",
            len(report.added),
            len(report.updated),
            len(report.removed),
            len(report.excluded_removed),
            report.num_skipped,
            *report.num_excluded,
        )
        return report

    def _walk(
        self, patterns: Sequence[str], known: dict[str, Any], prune_empty: bool
    ) -> LibraryScan:
        """Every root walked with ``patterns`` as the ``--exclude`` patterns (offline ones
        reported, not walked); see :func:`.library_walk.scan_library`."""
        roots = self.roots
        return scan_library(roots, self.path, patterns, held_by_root(roots, known), prune_empty)

    def _record_problems(
        self,
        problems: dict[str, tuple[str, FileStat]],
        known: dict[str, Any],
        report: UpdateReport,
    ) -> None:
        """Stores the entries the walk could not use (broken links, FIFOs, ...) as skipped, so
        that ``info`` lists them with their reason; each is reported once, when new."""
        new = [
            (p, reason, st)
            for p, (reason, st) in problems.items()
            if p not in known or (known[p].skip_reason, known[p][:2]) != (reason, tuple(st))
        ]
        if new:
            self.store.add_batch([], np.zeros((0, self.dim), np.float32), [], skipped=new)
        for p, reason, _ in new:
            report.skipped.setdefault(reason, []).append(p)

    def _reset(self, encoder: Any, source: str | None) -> None:
        """Forgets every embedding (switching the store's dtype when asked) and pins
        ``encoder``; only under the lock."""
        # First: a crash after it leaves an empty index, never a mixed one.
        self.store.clear(self._pending_store_dtype)
        self._pending_store_dtype = None
        self.dim = self.store.dim = int(encoder.dim)  # the store is empty: any dim fits
        self.manifest["encoder"] = self._encoder_entry(encoder, source)
        self.manifest["faiss"] = None
        self._save_manifest()
        self._encoder = encoder
        self.faiss.forget()

    def _writable(self) -> None:
        """Reopens a store opened for reading for writing; only under the lock."""
        if self.store.readonly:
            self.store.close()
            self.store = self.faiss.store = Store(self.path / DATABASE, self.dim)

    # --- the other writers: duplicate decisions, files moved away ---------------------------

    def mark_not_duplicates(self, paths: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
        """Records that ``paths`` are not duplicates of each other, pair by pair: later
        :meth:`duplicates` never group any two of them (A-B apart still lets A and C group).

        Args:
            paths: two or more indexed images, absolute or as keys (:meth:`paths`).

        Returns:
            The pairs recorded, relative paths.

        Raises:
            MoCoRetrievalError: fewer than two paths, or one that is not indexed.
        """
        rels = sorted({self.relative(p) for p in paths})
        if len(rels) < 2:
            raise MoCoRetrievalError("name at least two different images that are not duplicates")
        for rel in rels:
            record = self.store.file(rel)
            if record is None or record.vector_id is None:
                raise MoCoRetrievalError(f"{display(rel)} is not an indexed image of {self.path}")
        pairs = pairs_of(rels)
        with UpdateLock(self.path):  # a writer, like update: the lock before the first change
            self._writable()
            self.store.add_not_duplicates(pairs)
        return pairs

    def forget(self, paths: Sequence[str]) -> None:
        """Drops files moved away from the folder (relative paths) from the index now, as the
        next :meth:`update` would, and brings ``index.faiss`` in line.

        Raises:
            IndexBusyError: an update holds the lock; the next update drops them instead.
        """
        if not paths:
            return
        with UpdateLock(self.path):
            self._sync()
            self._writable()
            self.store.remove(list(paths))
            self.faiss.refresh(save=True)
