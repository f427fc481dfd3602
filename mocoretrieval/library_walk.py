"""Walking every root of a library as one folder: the walk, offline roots, and the embedding, all
by key (see :mod:`mocoretrieval.roots`).

A root is *offline* when its folder is missing, or lists nothing while the index holds files
of it (the mount point of an unmounted drive is an empty folder). An offline root is not walked:
its files keep their entries, and are reported, never counted as deleted. ``prune_empty`` walks
an empty root anyway (its files were really deleted); a missing folder is only forgotten by
removing the root (``mocoretrieval roots remove``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import embed
from .ignore import DEFAULTS, EXCLUDE, Rule, excluding_rule
from .pathsafety import under
from .roots import Root, Roots
from .store import FileStat
from .walk import empty_folders, scan_images

OFFLINE_MISSING = "folder missing (unmounted or moved?)"
OFFLINE_EMPTY = "folder empty (an unmounted drive?)"


def lists_nothing(folder: Path, exclude: Sequence[Path] = ()) -> bool:
    """Whether ``folder`` holds no entry but those of ``exclude`` (e.g. the index itself)."""
    skip = {os.path.realpath(p) for p in exclude}
    try:
        with os.scandir(folder) as entries:
            return all(os.path.realpath(e.path) in skip for e in entries)
    except OSError:
        return False


def offline_reason(root: Root, index_dir: Path, held: int, prune_empty: bool = False) -> str | None:
    """Why ``root`` is offline (see the module), or None when it is to be walked.

    Args:
        held: how many files the index holds of it.
        prune_empty: an empty folder is walked (its files are forgotten), not offline.
    """
    if not root.path.is_dir():
        return OFFLINE_MISSING
    if held and not prune_empty and lists_nothing(root.path, [index_dir]):
        return OFFLINE_EMPTY
    return None


def folder_key(root: Root, folder: str) -> str:
    """A folder relative to ``root`` (``"."``: the root) as a key, the form reports use."""
    if folder == ".":
        return "." if root.bare else root.name
    return root.key(folder)


@dataclass
class LibraryScan:
    """What :func:`scan_library` found; every path is a key.

    Attributes:
        stats: readable images -> size and mtime.
        problems: unusable image entries -> (reason, stat).
        unreadable: folders that could not be listed -> reason.
        excluded: what the ignore rules left out -> the rule (an ignore file's source is a key).
        offline: roots not walked (by name) -> why; their files are kept.
        where: each key found -> (its root, its path relative to it).
    """

    stats: dict[str, FileStat] = field(default_factory=dict)
    problems: dict[str, tuple[str, FileStat]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, Rule] = field(default_factory=dict)
    offline: dict[str, str] = field(default_factory=dict)
    where: dict[str, tuple[Root, str]] = field(default_factory=dict)


def held_by_root(roots: Roots, keys: Iterable[str]) -> dict[int, int]:
    """How many of ``keys`` each root holds, by root id."""
    out = {r.id: 0 for r in roots}
    for key in keys:
        found = roots.locate(key)
        if found is not None:
            out[found[0].id] += 1
    return out


def scan_library(
    roots: Roots,
    index_dir: Path,
    patterns: Sequence[str],
    held: dict[int, int],
    prune_empty: bool = False,
) -> LibraryScan:
    """Walks each online root with the ignore rules (``patterns`` relative to each root).

    Raises:
        IgnoreRuleError: a pattern is malformed, or an ignore file unreadable.
    """
    out = LibraryScan()
    for root in roots:
        reason = offline_reason(root, index_dir, held.get(root.id, 0), prune_empty)
        if reason is not None:
            out.offline[root.name] = reason
            continue
        scan = scan_images(root.path, exclude=[index_dir], patterns=patterns)
        for rel, st in scan.files.items():
            key = root.key(rel)
            out.stats[key] = FileStat(st.st_size, st.st_mtime_ns)
            out.where[key] = (root, rel)
        for rel, why in scan.problems.items():
            try:
                st = os.lstat(root.path / rel)
                stat = FileStat(st.st_size, st.st_mtime_ns)
            except (OSError, ValueError):  # e.g. the escaped name of a non-UTF-8 file
                stat = FileStat(0, 0)
            out.problems[root.key(rel)] = (why, stat)
        for folder, why in scan.unreadable.items():
            out.unreadable[folder_key(root, folder)] = why
        for path, rule in scan.excluded.items():
            if rule.source not in (DEFAULTS, EXCLUDE):
                rule = rule._replace(source=root.key(rule.source))
            out.excluded[root.key(path)] = rule
    return out


def offline_keys(roots: Roots, offline: Iterable[str], keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` of the roots named in ``offline``."""
    names = set(offline)
    return {k for k in keys if (found := roots.locate(k)) is not None and found[0].name in names}


def held_in_empty(roots: Roots, gone: Sequence[str], index_dir: Path) -> dict[str, list[str]]:
    """The keys of ``gone`` whose deepest existing folder lists nothing, by that folder's key
    (see :func:`.walk.empty_folders`); keys of no root are not held."""
    by_root: dict[int, list[tuple[str, str]]] = {}
    for key in gone:
        found = roots.locate(key)
        if found is not None:
            by_root.setdefault(found[0].id, []).append((key, found[1]))
    out: dict[str, list[str]] = {}
    for root in roots:
        pairs = by_root.get(root.id)
        if not pairs:
            continue
        to_key = {rel: key for key, rel in pairs}
        for folder, rels in empty_folders(root.path, list(to_key), exclude=[index_dir]).items():
            out.setdefault(folder_key(root, folder), []).extend(to_key[r] for r in rels)
    return out


def iter_library_embeddings(
    encoder: Any, where: dict[str, tuple[Root, str]], keys: Sequence[str], **kwargs: Any
) -> Iterator[embed.EmbeddedBatch]:
    """:func:`.embed.iter_embeddings` of ``keys``, root by root; batches name files by key."""
    by_root: dict[int, tuple[Root, dict[str, str]]] = {}
    for key in keys:
        root, rel = where[key]
        by_root.setdefault(root.id, (root, {}))[1][rel] = key
    for root, to_key in by_root.values():
        for batch in embed.iter_embeddings(encoder, root.path, list(to_key), **kwargs):
            batch.paths = [to_key[p] for p in batch.paths]
            batch.skipped = [(to_key[p], why) for p, why in batch.skipped]
            yield batch


def count_changes(index: Any) -> int:
    """How many files an update of ``index`` (an ``ImageIndex``: typed loosely, as the index
    imports this module) would add, re-embed, record or remove now.

    The folder is walked as the update walks it (same ignore rules, same files) and compared
    with the index's stat records; what an update keeps (files under a folder that cannot be
    listed or that lists nothing: an unmounted drive) is not a change. Reads only.
    """
    # ImageIndex's own walk and manifest reload, so that this agrees with update() exactly.
    index._sync()
    known = index.store.files()
    scan = index._walk(index.manifest.get("exclude", []), known, False)
    stats, problems, unreadable, excluded = (
        scan.stats,
        scan.problems,
        scan.unreadable,
        scan.excluded,
    )
    offline = offline_keys(index.roots, scan.offline, known)  # an offline root's: kept
    n = sum(1 for p, st in stats.items() if p not in known or known[p][:2] != tuple(st))
    n += sum(
        1
        for p, (reason, st) in problems.items()
        if p not in known or (known[p].skip_reason, known[p][:2]) != (reason, tuple(st))
    )
    gone = [
        p
        for p in known
        if p not in stats and p not in problems and p not in offline and not under(p, unreadable)
    ]
    if gone:
        kept = [p for p in gone if excluding_rule(p, excluded) is None]
        held = held_in_empty(index.roots, kept, index.path)
        n += len(gone) - sum(len(paths) for paths in held.values())
    return n
