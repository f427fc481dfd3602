"""`Ranks`: this process's place among the processes ``torchrun`` started; a world of one outside.

Like ``training/dist.py`` (which the library does not import: ``training`` depends on
``mocoretrieval``, not the other way), every helper falls back to rank 0 of a world of 1, so the
same code runs in one process. The ranks exchange only small Python objects (work lists,
statuses), never tensors, so the process group is gloo on CPUs and GPUs alike: NCCL would
stage the pickles through GPU memory, and needs each rank bound to its device first, for no
gain here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

# Ranks 1.. wait for rank 0's walk of the folder (tens of millions of files on a network
# filesystem take a while) and for the slowest rank at the end: far past torch's 30 minutes.
TIMEOUT = timedelta(hours=12)


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (``torch.distributed.run``) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


@dataclass(frozen=True)
class Ranks:
    """Who this process is among the ranks, and the two collectives the index needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout: timedelta = TIMEOUT) -> Ranks:
        """The ranks ``torchrun`` describes in the environment, joined in a gloo process
        group when there are several; a world of one outside ``torchrun``."""
        if not launched_by_torchrun():
            return cls()
        ranks = cls(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
        if ranks.world_size > 1 and not dist.is_initialized():
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            # Keys of its own per attempt: after an elastic restart, gloo on the agent's store
            # otherwise finds the dead attempt's addresses and waits on them (torch 2.14).
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(
                backend="gloo",
                store=dist.PrefixStore(f"mocoretrieval/attempt-{attempt}", store),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        return ranks

    def scatter(self, items: list[Any] | None) -> Any:
        """Rank 0's ``items[r]`` on each rank r (``items`` is read on rank 0 only)."""
        if self.world_size == 1:
            return items[0] if items is not None else None
        out: list[Any] = [None]
        dist.scatter_object_list(out, items if self.is_main else None, src=0)
        return out[0]

    def gather(self, item: Any) -> list[Any] | None:
        """Every rank's ``item`` in rank order, on rank 0; None elsewhere."""
        if self.world_size == 1:
            return [item]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(item, out, dst=0)
        return out

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
