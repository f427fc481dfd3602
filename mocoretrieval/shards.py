"""Shard stores: where each torchrun rank commits its share of the embeddings, and their merge.

A rank's shard is a :class:`~mocoretrieval.store.Store` of its own under the index directory,
``shards/rank-RRRRR-of-WWWWW.db``, written batch by batch like the index's store (a rank that
dies loses at most its batch in flight) and recording the weights it embedded with. Rank 0
reads every shard it finds before dealing work, whatever world size wrote it: a file a shard
holds as the walk sees it (same size and mtime) is not embedded again. At the end rank 0 copies
the shards' rows into the index's store, in the order a single process would have embedded
them, then deletes the shards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import MoCoRetrievalError
from .store import FileStat, Store

log = logging.getLogger(__name__)

SHARDS_DIRNAME = "shards"
# The shard's meta key for the weights hash of the encoder its vectors come from.
WEIGHTS_KEY = "weights_hash"
# Files copied per transaction of a merge: rows of a few KB (a 2048-d float32 vector and a
# thumbnail), a few tens of MB per commit.
MERGE_CHUNK = 2048


def shard_file(index_dir: Path, rank: int, world_size: int) -> Path:
    """The shard store of ``rank`` among ``world_size`` ranks."""
    return index_dir / SHARDS_DIRNAME / f"rank-{rank:05d}-of-{world_size:05d}.db"


def shard_files(index_dir: Path) -> list[Path]:
    """Every shard store under ``index_dir``, whatever world size wrote it, by name."""
    return sorted((index_dir / SHARDS_DIRNAME).glob("rank-*-of-*.db"))


def remove_shard(path: Path) -> None:
    """Deletes a shard store with its WAL files."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_shards(index_dir: Path) -> None:
    """Deletes every shard store, then the shards folder when nothing else is in it."""
    for path in shard_files(index_dir):
        remove_shard(path)
    with contextlib.suppress(OSError):
        (index_dir / SHARDS_DIRNAME).rmdir()


def open_shard(path: Path, dim: int, dtype: str, weights_hash: str) -> Store:
    """Creates, or reopens to go on, a rank's shard store, recording the weights its vectors
    come from before the first batch (a shard without them is discarded, not merged).

    Raises:
        MoCoRetrievalError: the shard holds vectors of another model or dtype (rank 0 deletes
            such shards before dealing work, so another run must be writing here).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(path, dim, dtype=dtype)
    recorded = store.get_meta(WEIGHTS_KEY)
    if recorded is None:
        store.set_meta(WEIGHTS_KEY, weights_hash)
    elif recorded != weights_hash:
        store.close()
        raise MoCoRetrievalError(
            f"{path} holds vectors of another model: is another `mocoretrieval index` writing "
            "to this index? Wait for it, then run the command again"
        )
    return store


def survey(
    index_dir: Path, dim: int, dtype: str, weights_hash: str, stats: Mapping[str, FileStat]
) -> dict[str, Path]:
    """Which of ``stats``'s files the shards already hold as the walk saw them (same size and
    mtime), embedded or skipped, and in which shard.

    Shards of another model or store dtype, or unreadable ones (a rank that died while creating
    it), are deleted: their rows cannot go into this index.
    """
    held: dict[str, Path] = {}
    for path in shard_files(index_dir):
        try:
            shard = Store(path, dim, readonly=True)
            try:
                usable = shard.get_meta(WEIGHTS_KEY) == weights_hash and shard.dtype == dtype
                files = shard.files() if usable else {}
            finally:
                shard.close()
        except MoCoRetrievalError as e:
            log.warning("ignoring the unreadable shard %s: %s", path, e)
            usable = False
        if not usable:
            log.warning("deleting %s: its vectors are not of this index's model and dtype", path)
            remove_shard(path)
            continue
        for p, record in files.items():
            st = stats.get(p)
            if st is not None and p not in held and (record.size, record.mtime_ns) == tuple(st):
                held[p] = path
    return held


def deal(sizes: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Splits files among ``world_size`` ranks, balanced by count and by bytes.

    Files are taken largest first (ties by path), ``world_size`` at a time; in each round the
    largest goes to the rank with the fewest bytes so far (ties: the lower rank), the next
    largest to the next, and so on. Every rank gets one file per round but the last, so counts
    differ by at most one; bytes by at most the largest file. The same input gives the same
    deal on every machine.

    Returns:
        Each rank's files, in the order of ``sizes``.
    """
    order = {p: i for i, p in enumerate(sizes)}
    ranked = sorted(sizes, key=lambda p: (-sizes[p], p))
    loads = [0] * world_size
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for start in range(0, len(ranked), world_size):
        lightest = sorted(range(world_size), key=lambda r: (loads[r], r))
        for path, rank in zip(ranked[start : start + world_size], lightest):
            shares[rank].append(path)
            loads[rank] += sizes[path]
    return [sorted(share, key=order.__getitem__) for share in shares]


def merge(
    store: Store,
    held: Mapping[str, Path],
    order: Sequence[str],
    stats: Mapping[str, FileStat],
    chunk: int = MERGE_CHUNK,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Copies the files of ``order`` that the shards hold (``held``, see :func:`survey`) into
    ``store``, ``chunk`` files per transaction and in ``order``, so the vectors get the ids a
    single process embedding ``order`` would have given them.

    A crash in the middle keeps the chunks committed; the shards are untouched, and the next
    run merges the rest.

    Returns:
        The paths embedded and the ``(path, reason)`` of those skipped, in ``order``.
    """
    wanted = [p for p in order if p in held]
    shards = {path: Store(path, store.dim, readonly=True) for path in set(held.values())}
    embedded: list[str] = []
    skipped: list[tuple[str, str]] = []
    try:
        for start in range(0, len(wanted), chunk):
            part = wanted[start : start + chunk]
            entries, keyframes = {}, {}
            for path, shard in shards.items():
                mine = [p for p in part if held[p] == path]
                entries.update(shard.entries(mine))
                keyframes.update(video_frames(shard, mine))
            paths, vectors, thumbs, skips, frames = [], [], [], [], []
            for p in part:
                entry = entries.get(p)
                if entry is None or (entry.record.size, entry.record.mtime_ns) != tuple(stats[p]):
                    continue  # changed under a running merge: the next run embeds it again
                if entry.vector is None:
                    skips.append((p, entry.record.skip_reason or "not embedded", stats[p]))
                    continue
                # A video: each keyframe, in time order, the first holding the thumbnail.
                for j, (vector, frame) in enumerate(keyframes.get(p, [(entry.vector, None)])):
                    paths.append(p)
                    vectors.append(vector)
                    thumbs.append(entry.thumbnail if j == 0 else None)
                    frames.append(frame)
            store.add_batch(
                paths,
                np.stack(vectors) if vectors else np.zeros((0, store.dim), np.float32),
                [stats[p] for p in paths],
                skips,
                thumbnails=thumbs,
                frames=frames if any(f is not None for f in frames) else (),
            )
            embedded += list(dict.fromkeys(paths))
            skipped += [(p, reason) for p, reason, _ in skips]
    finally:
        for shard in shards.values():
            shard.close()
    return embedded, skipped


def video_frames(
    shard: Store, paths: Sequence[str]
) -> dict[str, list[tuple[np.ndarray, tuple[float, float]]]]:
    """The keyframes a shard holds of the videos among ``paths``: path -> ``(vector,
    (timestamp, duration))`` in time order (see :mod:`mocoretrieval.video`)."""
    rows = shard.frames(paths)
    vectors = shard.vectors_by_id([r.vector_id for r in rows]) if rows else {}
    out: dict[str, list[tuple[np.ndarray, tuple[float, float]]]] = {}
    for r in rows:
        out.setdefault(r.path, []).append((vectors[r.vector_id], (r.timestamp, r.duration)))
    return out
