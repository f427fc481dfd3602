"""`mocoretrieval index` on the ranks of a ``torchrun``: wiring over :mod:`.sharded_embedding`.

Every rank runs the same command line. Rank 0 runs the single-process command with a
:class:`~mocoretrieval.sharded_embedding.ShardedEmbedding` as its embedding step, and alone
prints; the other ranks embed the share rank 0 sends them and exit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .embedder import Embedder
from .ranks import Ranks
from .sharded_embedding import ShardedEmbedding, follow, rank_device
from .shards import shard_files


def index_on_ranks(
    args: argparse.Namespace, run: Callable[[argparse.Namespace, ShardedEmbedding], int]
) -> int:
    """Runs ``mocoretrieval index`` on this rank: ``run(args, step)`` on rank 0 (the command,
    with ``step`` as its embedding step), :func:`follow` on the others."""
    ranks = Ranks.from_env()
    try:
        if not ranks.is_main:
            follow(
                ranks,
                _loader(args, rank_device(args.device, ranks)),
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
            )
            return 0
        step = ShardedEmbedding(
            ranks, batch_size=args.batch_size, workers=args.workers, device=args.device
        )
        try:
            return run(args, step)
        finally:
            step.release()
    finally:
        ranks.close()


def leftover_shards(index_path: Path, args: argparse.Namespace) -> ShardedEmbedding | None:
    """Outside ``torchrun``: the step that merges the shards an interrupted distributed run
    left in the index (and embeds the rest in this process), or None when there are none."""
    if not shard_files(index_path):
        return None
    return ShardedEmbedding(
        Ranks(), batch_size=args.batch_size, workers=args.workers, device=args.device
    )


def _loader(args: argparse.Namespace, device: str) -> Callable[[str | None], Embedder]:
    """How ranks 1.. load the index's model: the ``--model`` given, else the source the index
    records, with the same backend options as rank 0."""

    def load(source: str | None) -> Embedder:
        from .models import index_model

        return index_model(
            args.model or source,
            args.backend,
            device,
            root=args.roots[0] if args.roots else None,
            index_dir=args.index,
            quantize=args.quantize,
        )

    return load
