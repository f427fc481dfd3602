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
from .metrics import PrecisionRecall, duplicate_precision_recall
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
    """
    if not 0 < target_precision <= 1:
        raise DatasetError(f"the target precision is a fraction in (0, 1], got {target_precision}")
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
        skipped: list[tuple[str, str]] = []
        if groups is not None:
            known, copies = read_groups(groups, files), []
            source = str(groups)
        else:
            order = choose_images(files, n, seed)
            copies, _ = make_copies(folder, order, tmp, transforms, seed, limit=n)
            known = {c.original: c.original for c in copies} | {c.path: c.original for c in copies}
            copied = len({c.original for c in copies})
            source = f"copies: {transforms}, n={copied}, seed={seed}"
        step = progress_steps(progress, (len(files) + len(copies)) * len(encoders))
        results = []
        for name, encoder in encoders:
            start = time.perf_counter()
            found = embed_files(encoder, folder, files, progress=step, **common)
            extra = embed_files(
                encoder, tmp, [c.path for c in copies], reuse=False, progress=step, **common
            )
            paths = found.paths + extra.paths
            vectors = np.concatenate([found.vectors, extra.vectors])
            curve = duplicate_precision_recall(vectors, [known.get(p, p) for p in paths])
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
                    ModelRun(
                        len(found.skipped) + len(extra.skipped),
                        found.reused,
                        time.perf_counter() - start,
                    ),
                )
            )
            if len(results) == 1:
                skipped += found.skipped + extra.skipped
    return DuplicatesReport(
        str(folder),
        source,
        len(paths),  # of the last model: every model reads the same files
        results[0].curve.positives,
        target_precision,
        DEFAULT_DUPLICATE_THRESHOLD,
        results,
        skipped,
    )
