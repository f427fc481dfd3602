"""What every evaluation shares: reports that turn into JSON, the images of a folder, the
images chosen for copies, and progress counted over a whole run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError
from .eval_embed import Progress
from .walk import walk_images


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 6)  # NaN -> null
    return value


class Report:
    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able dicts and lists (NaN as None)."""
        return jsonable(self)


@dataclass
class ModelRun:
    """What evaluating one model cost: images it could not read, vectors reused, seconds."""

    skipped: int = 0
    reused: int = 0
    seconds: float = 0.0


def choose_images(files: Sequence[str], n: int, seed: int) -> list[str]:
    """The images in a seeded random order: copies are made of the first ``n`` readable ones."""
    if n < 1:
        raise DatasetError(f"--n must be at least 1, got {n}")
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


def folder_images(folder: str | Path) -> list[str]:
    files = walk_images(folder)
    if not files:
        raise DatasetError(f"no images under {folder}; pass a folder of photos")
    return files


def progress_steps(progress: Callable[[int, int], None] | None, total: int) -> Progress | None:
    """An increment callback over a ``progress(done, total)`` one (the CLI's bar)."""
    if progress is None:
        return None
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    return step
