"""Checkpoints of a run: written atomically each epoch, read back without running code.

A checkpoint holds everything a resumed run needs to continue exactly: both encoders (and the
queue or predictor), the optimizer, the epoch and step (the schedules are functions of them),
the data-order sampler, and every process's RNG states (torch, CUDA, numpy, python).
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocoretrieval.errors import CheckpointError

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pth"


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain containers (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: a run resumed on a machine that sees fewer GPUs (one per
        # process under torchrun) must not be asked to restore the states of GPUs it lacks.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def seed_all(seed: int) -> None:
    """Seeds every RNG a run draws from: python's, numpy's and torch's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible GPU's state
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file, then renames it over ``path``: a crash mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:  # make the bytes durable before the rename publishes them
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint (``weights_only``: tensors and plain containers only)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass the checkpoint.pth a run wrote")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); it may be truncated or not ours") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(
            f"{path} is not a mocoretrieval training checkpoint of format {FORMAT} (got {got}); "
            "a newer format needs a newer mocoretrieval"
        )
    return state
