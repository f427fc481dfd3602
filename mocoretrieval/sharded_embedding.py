"""Embedding an update's files on every rank of a ``torchrun``, each into its shard store.

Rank 0 runs the index's ordinary :meth:`~mocoretrieval.index.ImageIndex.update`, under the
index's lock: the walk, the ignore rules, the removals, the diff against the store are the
single-process ones. Only the embedding step is this module's :class:`ShardedEmbedding`:

1. it reads the shards a previous run left (:func:`.shards.survey`) and keeps what they hold;
2. it deals the rest among the ranks (:func:`.shards.deal`) and scatters the lists;
3. every rank embeds its list into its own shard store, batch by batch (:func:`embed_into`);
   ranks 1.. do so in :func:`follow`, and write nothing else;
4. the ranks gather their outcomes on rank 0, which merges the shards into the index's store
   (:func:`.shards.merge`) and deletes them; ``update`` then rebuilds the FAISS index and the
   manifest as always.

Ranks 1.. write only their shard, only after rank 0 has sent them work, hence while it holds
the lock: two runs on one index never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import embed
from .embedder import Embedder
from .errors import MoCoRetrievalError, ModelMismatchError
from .library_walk import iter_library_embeddings
from .ranks import Ranks
from .roots import Root, Roots
from .shards import deal, merge, open_shard, remove_shards, shard_file, survey
from .store import FileRecord, FileStat, Store

if TYPE_CHECKING:
    from .update import UpdateReport, Updating

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What rank 0 sends each rank: its files and the shard to embed them into."""

    roots: list[Root] = field(default_factory=list)  # the library's, to find each key's file
    shard: str = ""
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (path, size, mtime_ns)
    source: str | None = None  # the index's model, to load it from
    weights_hash: str = ""
    dim: int = 0
    dtype: str = "float32"
    stop: bool = False  # rank 0 ended before dealing work: nothing to do


@dataclass
class RankOutcome:
    """What a rank did with its plan, gathered on rank 0."""

    rank: int
    files: int = 0  # embedded or skipped
    seconds: float = 0.0
    error: str | None = None


def rank_device(device: str | None, ranks: Ranks) -> str:
    """The device of this rank: its own GPU (``cuda:LOCAL_RANK``, wrapping around the GPUs)
    when ``device`` is None or a bare ``cuda`` and there is one, else ``device`` or the CPU."""
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return device if device not in (None, "auto") else "cpu"


def _bf16(encoder: Embedder, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a torch model on a GPU (twice the throughput of float32 on tensor
    cores; the embedding is normalised in float32); nothing elsewhere."""
    if device.type == "cuda" and isinstance(encoder, torch.nn.Module):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def embed_into(
    shard: Store,
    encoder: Embedder,
    roots: Roots | Path,
    files: list[tuple[str, int, int]],
    *,
    batch_size: int | None,
    workers: int | None,
    device: str,
    local_world_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embeds ``files`` (key, size, mtime_ns) into ``shard``, one transaction per batch; each
    key is found under its root of ``roots`` (a folder: one root whose keys are plain paths).

    Returns:
        The files done (embedded or skipped).
    """
    if not files:
        return 0
    stats = {p: FileStat(size, mtime) for p, size, mtime in files}
    dev = embed.resolve_device(device)
    if workers is None:  # the machine's decoders are shared among its ranks
        workers = max(1, embed.auto_workers(len(files), dev) // max(1, local_world_size))
    if isinstance(roots, (str, os.PathLike)):
        roots = Roots([Root(0, "", Path(roots), bare=True)])
    where = {}
    for key in stats:
        found = roots.locate(key)
        if found is None:
            raise MoCoRetrievalError(f"{key} is of no root of the library; run the command again")
        where[key] = found
    batches = iter_library_embeddings(
        encoder, where, list(stats), batch_size=batch_size, workers=workers, device=dev
    )
    done = 0
    try:
        for batch in _each(batches, lambda: _bf16(encoder, dev)):
            batch.drop_non_finite()
            shard.add_batch(
                batch.paths,
                batch.vectors,
                [stats[p] for p in batch.paths],
                [(p, reason, stats[p]) for p, reason in batch.skipped],
                thumbnails=batch.thumbnails,
                frames=batch.frames,
            )
            done += len(batch)
            if progress is not None:
                progress(done, len(files))
    except RuntimeError as e:
        embed.raise_if_worker_died(e, done)
        raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return done


def _each(batches: Iterator[Any], context: Callable[[], Any]) -> Iterator[Any]:
    """The items of ``batches``, each computed inside a fresh ``context()``: autocast is
    thread state, which must not stay on while the caller commits."""
    while True:
        with context():
            item = next(batches, None)
        if item is None:
            return
        yield item


class ShardedEmbedding:
    """Rank 0's embedding step of :meth:`ImageIndex.update` (its ``embed`` argument): shares
    the files to embed among the ranks and merges their shards into the index.

    Also used in one process, without ``torchrun``, to merge the shards an interrupted
    distributed run left, and embed the rest.

    Args:
        ranks: this process (rank 0) and its world.
        batch_size, workers, device: as for ``update``; the device of each rank is its own
            GPU (see :func:`rank_device`), and ``workers`` defaults to the machine's share.

    Attributes:
        outcomes: what each rank did, in rank order, once the step ran.
        reused: files found done in the shards of an earlier run.
        embed_seconds: from dealing the work to the last rank's end.
        merge_seconds: copying the shards into the index's store.
    """

    def __init__(
        self,
        ranks: Ranks,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        device: str | None = None,
    ) -> None:
        self.ranks = ranks
        self.batch_size, self.workers, self.device = batch_size, workers, device
        self.outcomes: list[RankOutcome] = []
        self.reused = 0
        self.embed_seconds = self.merge_seconds = 0.0
        self._sent = False

    def __call__(
        self,
        index: Updating,
        todo: list[str],
        stats: dict[str, FileStat],
        known: dict[str, FileRecord],
        report: UpdateReport,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Embeds ``todo`` on every rank and merges it into ``index``'s store, recording the
        files in ``report`` as ``update`` does."""
        pin = index.manifest["encoder"]
        wanted = {p: stats[p] for p in todo}
        held = survey(index.path, index.dim, index.store.dtype, pin["weights_hash"], wanted)
        self.reused = len(held)
        remaining = [p for p in todo if p not in held]
        encoder = index.encoder if remaining else None  # loaded (and exported) once, here first
        t0 = time.perf_counter()
        shares = deal({p: stats[p].size for p in remaining}, self.ranks.world_size)
        plans = [
            Plan(
                roots=list(index.roots),
                shard=str(shard_file(index.path, rank, self.ranks.world_size)),
                files=[(p, *stats[p]) for p in share],
                source=pin["source"],
                weights_hash=pin["weights_hash"],
                dim=index.dim,
                dtype=index.store.dtype,
            )
            for rank, share in enumerate(shares)
        ]
        self._sent = True
        plan = self.ranks.scatter(plans)
        mine = _run(plan, self.ranks, lambda _: encoder, self, progress)
        try:
            outcomes = self.ranks.gather(mine)
        except RuntimeError as e:  # gloo: a rank's connection closed, it died
            raise MoCoRetrievalError(
                f"a rank stopped before the end ({e}); the batches done are kept in "
                f"{index.path / 'shards'}: run the same command again to continue"
            ) from e
        self.outcomes = outcomes or [mine]
        self.embed_seconds = time.perf_counter() - t0
        failed = [o for o in self.outcomes if o.error]
        if failed:
            raise MoCoRetrievalError(
                "; ".join(f"rank {o.rank}: {o.error}" for o in failed)
                + f". The batches done are kept in {index.path / 'shards'}: run the same "
                "command again to continue"
            )
        t1 = time.perf_counter()
        held = survey(index.path, index.dim, index.store.dtype, pin["weights_hash"], wanted)
        embedded, skipped = merge(index.store, held, todo, stats)
        remove_shards(index.path)
        self.merge_seconds = time.perf_counter() - t1
        for p in embedded:
            (report.updated if p in known else report.added).append(p)
        for p, reason in skipped:
            report.skipped.setdefault(reason, []).append(p)
        missing = len(todo) - len(embedded) - len(skipped)
        if missing:
            log.warning("%d files changed while being embedded: the next run embeds them", missing)

    def release(self) -> None:
        """Tells the other ranks to stop when rank 0 ended before sending them work (e.g. the
        index is busy, a pattern is malformed, there was nothing to update): call it last."""
        if not self._sent and self.ranks.world_size > 1:
            self._sent = True
            self.ranks.scatter([Plan(stop=True)] * self.ranks.world_size)

    def summary(self) -> str:
        """One line: files per rank, files reused from shards, embedding and merge times."""
        per_rank = ", ".join(str(o.files) for o in self.outcomes) or "-"
        return (
            f"{self.ranks.world_size} ranks embedded {per_rank} files ({self.reused} found done "
            f"in the shards of an earlier run) in {self.embed_seconds:.1f} s; merged in "
            f"{self.merge_seconds:.3f} s"
        )


def _run(
    plan: Plan,
    ranks: Ranks,
    load: Callable[[str | None], Embedder],
    opts: ShardedEmbedding | _Options,
    progress: Callable[[int, int], None] | None = None,
) -> RankOutcome:
    """Carries ``plan`` out on this rank; any failure is returned, to be gathered."""
    outcome = RankOutcome(ranks.rank)
    t0 = time.perf_counter()
    try:
        if plan.files:
            encoder = load(plan.source)
            if encoder.weights_hash() != plan.weights_hash:
                raise ModelMismatchError(
                    f"rank {ranks.rank} loaded other weights than the index's "
                    f"({plan.weights_hash[:12]}): pass the same --model on every node"
                )
            shard = open_shard(Path(plan.shard), plan.dim, plan.dtype, plan.weights_hash)
            try:
                outcome.files = embed_into(
                    shard,
                    encoder,
                    Roots(plan.roots),
                    plan.files,
                    batch_size=opts.batch_size,
                    workers=opts.workers,
                    device=rank_device(opts.device, ranks),
                    local_world_size=ranks.local_world_size,
                    progress=progress,
                )
            finally:
                shard.close()
    except Exception as e:  # any failure: gathered on rank 0, then raised here too
        outcome.error = f"{e}"
        outcome.seconds = time.perf_counter() - t0
        if ranks.is_main or ranks.world_size == 1:
            return outcome
        ranks.gather(outcome)
        raise
    outcome.seconds = time.perf_counter() - t0
    return outcome


@dataclass(frozen=True)
class _Options:
    batch_size: int | None
    workers: int | None
    device: str | None


def follow(
    ranks: Ranks,
    load: Callable[[str | None], Embedder],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
) -> RankOutcome | None:
    """What ranks 1.. do: wait for rank 0's plan, embed their share into their shard, report.

    Args:
        ranks: this process and its world (not rank 0).
        load: the embedder of a model source (the index's, which the plan names); its weights
            must be the index's.
        batch_size, workers, device: as for ``update``.

    Returns:
        What this rank did; None when rank 0 sent no work (it reports why).

    Raises:
        MoCoRetrievalError: this rank failed (rank 0 is told, and says so too).
    """
    plan: Plan = ranks.scatter(None)
    if plan.stop:
        return None
    outcome = _run(plan, ranks, load, _Options(batch_size, workers, device))
    ranks.gather(outcome)
    return outcome
