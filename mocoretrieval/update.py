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
from .data import empty_folders, scan_images
from .embedder import Embedder
from .errors import MoCoRetrievalError
from .faiss_file import FaissFile
from .ignore import Rule, count_excluded, excluding_rule
from .layout import DATABASE, UpdateLock, now
from .pathsafety import display, under
from .store import FileStat, Store

log = logging.getLogger(__name__)

# How ``update`` can have its files embedded elsewhere (see its ``embed_step`` argument).
EmbedStep = Callable[..., None]


@dataclass
class UpdateReport:
    """What one :meth:`ImageIndex.update` did. Paths are relative to the root.

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
    # unmounted drive; "." for the root): folder -> files kept. ``prune_empty`` removes them.
    empty: dict[str, int] = field(default_factory=dict)
    # What the ignore rules left out: source -> pattern -> {"files": n, "folders": n}, image
    # files and the folders not entered (see :func:`.ignore.count_excluded`).
    excluded: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # The files of ``removed`` that the ignore rules now exclude (the rules changed, or an
    # ignore file was added): removed from the index as if deleted; the files are not touched.
    excluded_removed: list[str] = field(default_factory=list)
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
    """The writing half of `ImageIndex`: :meth:`update` and what only it calls, under the lock."""

    # Set by ImageIndex.__init__.
    path: Path
    root: Path
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
    _save_manifest: Callable[[], None]
    _encoder_entry: Callable[[Embedder, str | None], dict[str, Any]]

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

        Files under a folder that cannot be listed, or that lists nothing at all (what the mount
        point of an unmounted drive looks like; the root too), are kept and reported in
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
                really deleted, not unmounted).
            exclude: gitignore patterns, relative to the root, to leave out; kept in the
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
            patterns = list(self.manifest.get("exclude", []) if exclude is None else exclude)
            # The walk first: a malformed pattern, like a bad index type, changes nothing.
            stats, problems, report.unreadable, excluded = self._walk(patterns)
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
            report.excluded = count_excluded(excluded)
            if patterns != self.manifest.get("exclude", []):
                # Kept before the removals they cause: an interrupted run keeps the new rules.
                self.manifest["exclude"] = patterns
                self._save_manifest()
            known = self.store.files()
            gone = sorted(
                p
                for p in set(known) - set(stats) - set(problems)
                if not under(p, report.unreadable)
            )
            report.excluded_removed = [p for p in gone if excluding_rule(p, excluded)]
            now_excluded = set(report.excluded_removed)
            held = (
                {}
                if prune_empty
                else empty_folders(
                    self.root, [p for p in gone if p not in now_excluded], exclude=[self.path]
                )
            )
            kept = {p for paths in held.values() for p in paths}
            report.removed = [p for p in gone if p not in kept]
            report.empty = {display(folder): len(paths) for folder, paths in held.items()}
            for folder, n in report.empty.items():
                log.warning("%s lists nothing but held %d indexed files: kept", folder, n)
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
                batches = embed.iter_embeddings(
                    self.encoder,
                    self.root,
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
                        )
                        for p in batch.paths:
                            (report.updated if p in known else report.added).append(p)
                        for p, reason in batch.skipped:
                            report.skipped.setdefault(reason, []).append(p)
                        done += len(batch.paths) + len(batch.skipped)
                        if progress is not None:
                            progress(done, len(todo))
                except RuntimeError as e:
                    # iter_embeddings recovers from its own dead workers and keeps them off
                    # torch's SIGCHLD handler; a DataLoader of the caller's, still registered
                    # there, can have a death reported here, between batches.
                    if not embed.worker_died(e):
                        raise
                    raise MoCoRetrievalError(
                        f"a decoding worker died ({e}); the {done} files done so far are "
                        "saved: run the same command again to continue"
                    ) from e
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
        self, patterns: Sequence[str]
    ) -> tuple[
        dict[str, FileStat], dict[str, tuple[str, FileStat]], dict[str, str], dict[str, Rule]
    ]:
        """``(readable images -> size and mtime, unusable image entries -> (reason, stat),
        folders that could not be listed -> reason, what the ignore rules excluded -> rule)``,
        with ``patterns`` as the ``--exclude`` patterns."""
        scan = scan_images(self.root, exclude=[self.path], patterns=patterns)
        stats = {rel: FileStat(st.st_size, st.st_mtime_ns) for rel, st in scan.files.items()}
        problems: dict[str, tuple[str, FileStat]] = {}
        for rel, reason in scan.problems.items():
            try:
                st = os.lstat(self.root / rel)
                problems[rel] = (reason, FileStat(st.st_size, st.st_mtime_ns))
            except (OSError, ValueError):  # e.g. the escaped name of a non-UTF-8 file
                problems[rel] = (reason, FileStat(0, 0))
        return stats, problems, scan.unreadable, scan.excluded

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
