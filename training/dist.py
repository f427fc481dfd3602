"""Distributed helpers that fall back to rank 0 of a world of 1, so one code path runs anywhere."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_from_env(device_type: str) -> bool:
    """Joins the process group ``torchrun`` describes in the environment, if any.

    NCCL on GPU, gloo on CPU. Returns True when running distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` of every process along dim 0 (no gradient), rank order."""
    if get_world_size() == 1:
        return x
    x = x.contiguous()
    # Contiguous outputs: empty_like would copy a channels_last layout, which gloo and NCCL
    # fill as if it were contiguous, scrambling the gathered images.
    out = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Gives every process the ``x`` of rank ``src`` (in place)."""
    if get_world_size() > 1:
        dist.broadcast(x, src)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over processes (a new tensor)."""
    if get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
