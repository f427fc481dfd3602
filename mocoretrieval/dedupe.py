"""Cleaning up duplicates without losing a file: which copy to keep, journaled moves, `undo`.

A clean-up is three steps. :func:`suggest` turns duplicate groups into proposals (which copy
each group keeps, which are proposed for removal); :func:`apply` moves the proposed files into
a folder (keeping their relative paths) or to the trash, writing each move to a journal in the
index folder *before* touching the file and marking it done after; :func:`undo` replays the
latest journal backwards and puts every file back, byte for byte, at its original path. No
step ever overwrites a file: a move or restore onto an existing path is refused.

The journal is JSON lines, each fsynced: ``begin`` (root, mode), then per file ``move`` (source,
destination, BLAKE2b of its bytes) and ``done`` (where it went), and after an undo ``restored``
and ``undone``. A crash between ``move`` and ``done`` is resolved by looking at the disk.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .duplicates import file_hash
from .errors import IndexBusyError, MoCoRetrievalError
from .journal import Journal, journals
from .layout import UpdateLock, now
from .pathsafety import display
from .safemove import TRASH_HELP, locate_trashed, move_file, send_to_trash

log = logging.getLogger(__name__)

KEEP_RULES = ("largest", "oldest", "newest")  # or a glob pattern (see `keeper`)


# --- which copy to keep ---------------------------------------------------------------------


@dataclass
class Proposal:
    """What to do with one duplicate group. Paths are absolute.

    Attributes:
        group_id: the group's id (:attr:`~mocoretrieval.index.DuplicateGroup.id`).
        tier: ``identical``, ``near`` or ``similar``.
        keep: the files kept, the suggested keeper first (empty only for an empty group).
        remove: the files proposed for removal; never a reference file.
        note: why nothing is proposed, when so.
    """

    group_id: str
    tier: str
    keep: list[str]
    remove: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def keeper(self) -> str | None:
        return self.keep[0] if self.keep else None


def _pixels(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - an unreadable file is the smallest
        return 0


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def keeper(
    paths: Sequence[str], rule: str, root: str | Path | Callable[[str], str] | None = None
) -> str | None:
    """The member of ``paths`` (absolute, in group order) to keep under ``rule``.

    ``largest``: most pixels, then most bytes; ``oldest``/``newest``: by modification time;
    anything else is a glob matched against the path relative to ``root`` and the absolute
    path (``'*/originals/*'``, ``'*.png'``): the first member matching it. ``root`` may be the
    index's ``relative`` instead (a library of several roots): patterns then match the file's
    key, ``NAME/...``. Ties go to the first path in order.

    Returns:
        The path, or None when a pattern matches no member (the group is then left alone).
    """
    if not paths:
        return None
    if rule in ("oldest", "newest"):
        times = {p: (st.st_mtime_ns if (st := _stat(p)) else 0) for p in paths}
        pick = min if rule == "oldest" else max
        best = pick(times.values())
        return next(p for p in paths if times[p] == best)
    if rule == "largest":
        sizes = {p: (_pixels(p), st.st_size if (st := _stat(p)) else 0) for p in paths}
        best = max(sizes.values())
        return next(p for p in paths if sizes[p] == best)
    for p in paths:
        rel = root(p) if callable(root) else os.path.relpath(p, root) if root is not None else p
        if fnmatch.fnmatch(rel, rule) or fnmatch.fnmatch(p, rule):
            return p
    return None


def _under(path: str, folders: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def suggest(
    groups: Iterable[Any],
    keep: str = "largest",
    references: Sequence[str | os.PathLike] = (),
    root: str | Path | Callable[[str], str] | None = None,
) -> list[Proposal]:
    """A proposal per group: one copy kept by ``keep``, the others proposed for removal.

    A file under a ``references`` folder is never proposed: a group holding one keeps its
    reference files and proposes all the others; a group of reference files only proposes
    nothing.

    Args:
        groups: :class:`~mocoretrieval.index.DuplicateGroup` objects (of ``SearchResult``).
        keep: ``largest``, ``oldest``, ``newest`` or a glob pattern (see :func:`keeper`).
        references: folders whose files are never proposed for removal.
        root: the indexed root, or the index's ``relative``, for patterns on relative paths
            (see :func:`keeper`).
    """
    refs = [os.path.realpath(os.path.expanduser(r)) for r in references]
    out = []
    for group in groups:
        paths = [r.path for r in group]
        tier, gid = getattr(group, "tier", "near"), getattr(group, "id", "")
        kept_refs = [p for p in paths if _under(p, refs)]
        if kept_refs:
            first = keeper(kept_refs, keep, root) or kept_refs[0]
            keep_list = [first] + [p for p in kept_refs if p != first]
            remove = [p for p in paths if p not in kept_refs]
            note = "" if remove else "every file is under a reference folder"
            out.append(Proposal(gid, tier, keep_list, remove, note))
            continue
        chosen = keeper(paths, keep, root)
        if chosen is None:
            note = f"no file matches {keep!r}: left alone"
            out.append(Proposal(gid, tier, list(paths), [], note))
            continue
        out.append(Proposal(gid, tier, [chosen], [p for p in paths if p != chosen]))
    return out


# --- apply and undo ---------------------------------------------------------------------------


@dataclass
class Step:
    """One file of a clean-up: from where to where (None: the trash)."""

    src: str
    dst: str | None


@dataclass
class ApplyReport:
    """What :func:`apply` did (or, for a dry run, would do).

    Attributes:
        steps: the moves, in order; for a dry run, the plan.
        moved: sources moved (or trashed).
        failed: source -> why it was left in place.
        journal: the journal written; None for a dry run or when nothing was to be done.
        index_note: what became of the index (the moved files dropped, or why not yet).
    """

    steps: list[Step] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    journal: Path | None = None
    index_note: str = ""


def plan_steps(
    proposals: Iterable[Proposal],
    root: Path | Callable[[str], str],
    move_to: Path | None,
) -> list[Step]:
    """The moves of ``proposals``: into ``move_to`` at the same path relative to ``root`` (names
    cannot collide), or to the trash when ``move_to`` is None. ``root`` may be the index's
    ``relative`` instead (a library of several roots): then at the file's key, ``NAME/...``."""
    steps = []
    for proposal in proposals:
        for src in proposal.remove:
            rel = root(src) if callable(root) else os.path.relpath(src, root)
            dst = None if move_to is None else str(move_to / rel)
            steps.append(Step(src, dst))
    return steps


def apply(
    index: Any,
    proposals: Iterable[Proposal],
    *,
    move_to: str | os.PathLike | None = None,
    trash: bool = False,
    dry_run: bool = False,
    mover: Callable[[Path, Path], None] | None = None,
    trasher: Callable[[Path], None] | None = None,
) -> ApplyReport:
    """Moves every file proposed for removal into ``move_to``, or to the trash, journaled.

    Each move is written to the journal (with the file's BLAKE2b) before the file is touched
    and marked done after, so :func:`undo` can always put it back. Moved files are then
    dropped from the index (or, when an update holds its lock, by the next ``index`` run).

    Args:
        index: the open :class:`~mocoretrieval.index.ImageIndex` the groups came from.
        proposals: from :func:`suggest`.
        move_to: a folder outside the indexed root to move the files into.
        trash: send them to the trash instead.
        dry_run: only plan: nothing is touched, no journal is written.
        mover: moves one file (default :func:`~mocoretrieval.safemove.move_file`); a test
            passes one that crashes.
        trasher: trashes one file (default :func:`~mocoretrieval.safemove.send_to_trash`).

    Raises:
        MoCoRetrievalError: neither or both of ``move_to`` and ``trash``, or ``move_to`` inside
            the indexed root.
    """
    mover, trasher = mover or move_file, trasher or send_to_trash
    root = Path(index.root)
    roots = [r.path for r in index.roots] if hasattr(index, "roots") else [root]
    if (move_to is None) == (not trash):
        raise MoCoRetrievalError("choose one of --move-to DIR and --trash")
    target = None
    if move_to is not None:
        target = Path(os.path.abspath(os.path.expanduser(move_to)))
        for inside in roots:
            if target == inside or inside in target.parents:
                raise MoCoRetrievalError(
                    f"--move-to {target} is inside the indexed folder {inside}: the next "
                    "`index` run would index the moved files again; pick a folder outside it"
                )
    # One root: moved files keep their path relative to it; several: their key (NAME/...).
    where = root if len(roots) == 1 else index.relative
    report = ApplyReport(steps=plan_steps(proposals, where, target))
    if dry_run or not report.steps:
        return report
    journal = Journal.create(Path(index.path))
    report.journal = journal.path
    journal.write(
        op="begin",
        version=1,
        root=str(root),
        to=str(target) if target else None,
        mode="trash" if trash else "move",
        time=now(),
    )
    for n, step in enumerate(report.steps):
        src = Path(step.src)
        try:
            digest = file_hash(src)
        except OSError as e:
            report.failed[step.src] = f"cannot read it ({e.strerror or e})"
            continue
        journal.write(op="move", n=n, src=step.src, dst=step.dst, blake2b=digest)
        try:
            if step.dst is not None:
                mover(src, Path(step.dst))
                where, info = step.dst, None
            else:
                trasher(src)
                found = locate_trashed(src)
                where, info = (str(found[0]), str(found[1])) if found else (None, None)
        except FileExistsError:
            report.failed[step.src] = f"{display(str(step.dst))} exists: not overwritten"
            journal.write(op="failed", n=n)
            continue
        except OSError as e:
            report.failed[step.src] = str(e.strerror or e)
            journal.write(op="failed", n=n)
            continue
        journal.write(op="done", n=n, dst=where, info=info)
        report.moved.append(step.src)
    if hasattr(index, "relative"):  # the key, the root's name in front in a library
        rels = [index.relative(p) for p in report.moved]
    else:
        rels = [os.path.relpath(p, root).replace(os.sep, "/") for p in report.moved]
    try:
        index.forget(rels)
        report.index_note = f"{len(rels)} moved files dropped from the index"
    except IndexBusyError:
        report.index_note = "an update is running: the next `mocoretrieval index` drops them"
    return report


@dataclass
class UndoReport:
    """What :func:`undo` did.

    Attributes:
        journal: the journal replayed.
        restored: original paths put back.
        problems: original path -> why it was not put back (and where the file is).
    """

    journal: Path
    restored: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


def _same_bytes(path: Path, digest: str) -> bool:
    try:
        return file_hash(path) == digest
    except OSError:
        return False


def undo(
    index_dir: str | os.PathLike, *, mover: Callable[[Path, Path], None] | None = None
) -> UndoReport:
    """Puts back every file of the latest journal not undone yet, last moved first.

    A file is restored only where nothing is now: an original path occupied by a different
    file is reported, never overwritten (the moved copy stays where it is). A file the trash
    holds where this cannot find it is reported with where to look.

    Like every writer it holds the index lock throughout: two undos never replay one journal
    at once, and an update never walks a folder half put back.

    Raises:
        IndexBusyError: another writer (`index`, `watch`, an undo) holds the lock; nothing
            was changed.
        MoCoRetrievalError: no journal to undo.
    """
    with UpdateLock(Path(index_dir)):
        return _undo(Path(index_dir), mover or move_file)


def _undo(index_dir: Path, mover: Callable[[Path, Path], None]) -> UndoReport:
    """:func:`undo`, under the lock."""
    pending = [j for j in journals(Path(index_dir)) if not _undone(Journal(j).records())]
    if not pending:
        raise MoCoRetrievalError(f"nothing to undo: no clean-up journal in {index_dir}")
    journal = Journal(pending[-1])
    report = UndoReport(journal.path)
    records = journal.records()
    intents = {r["n"]: r for r in records if r.get("op") == "move"}
    done = {r["n"]: r for r in records if r.get("op") == "done"}
    finished = {r["n"] for r in records if r.get("op") in ("restored", "failed")}
    for n in sorted(intents, reverse=True):
        if n in finished:
            continue
        intent = intents[n]
        src, digest = Path(intent["src"]), intent["blake2b"]
        # Interrupted between the journal and the move, the disk tells what happened.
        where, info = (done[n].get("dst"), done[n].get("info")) if n in done else (None, None)
        if where is None and intent.get("dst") is not None:
            where = intent["dst"]
        elif where is None:  # trashed where it could not be found then: look again
            found = locate_trashed(src)
            where, info = (str(found[0]), str(found[1])) if found else (None, None)
        held = Path(where) if where else None
        if held is None or not os.path.lexists(held):
            if _same_bytes(src, digest):  # never moved (a crash before), or already back
                report.restored.append(str(src))
                journal.write(op="restored", n=n)
                continue
            report.problems[str(src)] = (
                f"cannot find it in the trash: {TRASH_HELP}"
                if intent.get("dst") is None
                else f"it is no longer at {held}; nothing was changed"
            )
            continue
        if os.path.lexists(src):
            if _same_bytes(src, digest):
                report.restored.append(str(src))
                journal.write(op="restored", n=n)
                log.info("%s is already in place; the copy at %s is left", display(str(src)), held)
                continue
            report.problems[str(src)] = (
                f"another file is now at this path: not overwritten; the original is at {held}"
            )
            continue
        try:
            mover(held, src)
        except OSError as e:
            report.problems[str(src)] = f"cannot move it back from {held}: {e.strerror or e}"
            continue
        if info:
            with contextlib.suppress(OSError):
                os.unlink(info)
        if not _same_bytes(src, digest):
            log.warning("%s was changed after it was moved; restored as it is", display(str(src)))
        journal.write(op="restored", n=n)
        report.restored.append(str(src))
    if not report.problems:
        journal.write(op="undone", time=now())
    return report


def _undone(records: list[dict[str, Any]]) -> bool:
    return any(r.get("op") == "undone" for r in records)
