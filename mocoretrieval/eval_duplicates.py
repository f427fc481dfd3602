"""Precision and recall of ``duplicates`` over thresholds, against known groups of images."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .duplicates import DEFAULT_DUPLICATE_THRESHOLD
from .edits import make_copies
from .embedder import Embedder
from .errors import DatasetError
from .eval_embed import embed_files, load_models
from .eval_report import ModelRun, Report, choose_images, folder_images, progress_steps
from .metrics import PrecisionRecall, duplicate_precision_recall, pool_precision_recall
from .sources import DEFAULT_MODEL


@dataclass
class DuplicatesResult:
    """One model's ``duplicates`` precision and recall: the whole curve, the threshold
    recommended for the target precision (None: never reached), and the default's."""

    model: str
    curve: PrecisionRecall
    recommended: float | None
    at_recommended: tuple[float, float] | None
    at_default: tuple[float, float]
    run: ModelRun


@dataclass
class DuplicatesReport(Report):
    folder: str
    groups_from: str
    images: int
    positives: int
    target_precision: float
    default_threshold: float
    results: list[DuplicatesResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_groups(path: str | Path, files: Sequence[str]) -> dict[str, str]:
    """``path,group`` rows of a CSV (a header row is allowed) -> group by relative path.

    Raises:
        DatasetError: a row is malformed or names a file that is not an image of the folder.
    """
    known = set(files)
    groups: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or (n == 1 and row[:2] == ["path", "group"]):
                    continue
                if len(row) != 2:
                    raise DatasetError(f"{path}:{n}: expected 'path,group', got {row}")
                if row[0] not in known:
                    raise DatasetError(
                        f"{path}:{n}: {row[0]!r} is not an image under the folder; paths are "
                        "relative to it"
                    )
                groups[row[0]] = row[1]
    except OSError as e:
        raise DatasetError(f"cannot read --groups {path}: {e.strerror or e}") from e
    return groups


def eval_duplicates(
    folder: str | Path,
    models: Sequence[Embedder | str | os.PathLike] = (DEFAULT_MODEL,),
    *,
    groups: str | Path | None = None,
    n: int = 100,
    seed: int = 0,
    draws: int = 1,
    transforms: str = "standard",
    target_precision: float = 0.95,
    backend: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> DuplicatesReport:
    """Precision and recall of ``duplicates`` over thresholds against known groups.

    The groups are a ``--groups`` CSV (``path,group``; unlisted images have no duplicate) or,
    without one, the edited copies of ``n`` images (each original with its copies).

    Args:
        draws: independent draws of the copies (seeds ``seed`` to ``seed + draws - 1``), each
            scored with the folder's images, their pairs pooled into one curve
            (:func:`~mocoretrieval.metrics.pool_precision_recall`): one draw of a few dozen
            pictures moves recall by several points.
    """
    if not 0 < target_precision <= 1:
        raise DatasetError(f"the target precision is a fraction in (0, 1], got {target_precision}")
    if draws < 1:
        raise DatasetError(f"--draws must be at least 1, got {draws}")
    if groups is not None and draws > 1:
        raise DatasetError("--draws repeats generated copies; a --groups CSV is one fixed set")
    files = folder_images(folder)
    encoders = load_models(
        models,
        backend=backend,
        device=device,
        quantize=quantize,
        calibration_images=[Path(folder) / f for f in files],
        calibrated_on=str(Path(folder).resolve()),
        notify=notify,
    )
    common = {"batch_size": batch_size, "workers": workers, "device": device}
    with tempfile.TemporaryDirectory(prefix="mocoretrieval-duplicates-") as tmp:
        # (known group by path, the copies to embed, the folder they are in) per draw
        sets: list[tuple[dict[str, str], list, str | Path]] = []
        if groups is not None:
            sets.append((read_groups(groups, files), [], tmp))
            source = str(groups)
        else:
            for s in range(seed, seed + draws):
                out = Path(tmp) / f"seed-{s}"
                order = choose_images(files, n, s)
                copies, _ = make_copies(folder, order, out, transforms, s, limit=n)
                known = {k: c.original for c in copies for k in (c.original, c.path)}
                sets.append((known, copies, out))
            copied = len({c.original for c in sets[0][1]})
            seeds = f"seed={seed}" if draws == 1 else f"seeds={seed}-{seed + draws - 1}"
            source = f"copies: {transforms}, n={copied}, {seeds}"
        total = len(files) + sum(len(copies) for _, copies, _ in sets)
        step = progress_steps(progress, total * len(encoders))
        results: list[DuplicatesResult] = []
        skipped: list[tuple[str, str]] = []
        for name, encoder in encoders:
            start = time.perf_counter()
            found = embed_files(encoder, folder, files, progress=step, **common)
            curves, missed, images = [], list(found.skipped), len(found.paths)
            for known, copies, where in sets:
                extra = embed_files(
                    encoder, where, [c.path for c in copies], reuse=False, progress=step, **common
                )
                paths = found.paths + extra.paths
                vectors = np.concatenate([found.vectors, extra.vectors])
                curves.append(duplicate_precision_recall(vectors, [known.get(p, p) for p in paths]))
                missed += extra.skipped
                images += len(extra.paths)
            curve = pool_precision_recall(curves)  # one draw: its own curve
            if curve.positives == 0:
                raise DatasetError("no two images share a group: nothing to find")
            best = curve.threshold_for(target_precision)
            results.append(
                DuplicatesResult(
                    name,
                    curve,
                    best,
                    curve.at(best) if best is not None else None,
                    curve.at(DEFAULT_DUPLICATE_THRESHOLD),
                    ModelRun(len(missed), found.reused, time.perf_counter() - start),
                )
            )
            if len(results) == 1:
                skipped = missed
    return DuplicatesReport(
        str(folder),
        source,
        images,  # of the last model: every model reads the same files
        results[0].curve.positives,
        target_precision,
        DEFAULT_DUPLICATE_THRESHOLD,
        results,
        skipped,
    )
