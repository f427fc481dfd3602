"""How good an encoder is at retrieval: copy detection, kNN on labeled images, duplicates.

The Python side of ``mocoretrieval eval``: each function embeds with the index's pipeline
(:mod:`mocoretrieval.eval_embed`), scores with :mod:`mocoretrieval.metrics` and returns a
report dataclass, one result per model, with ``to_dict()`` for JSON.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .edits import COMBINED, get_preset, kinds_of, make_copies
from .embedder import Embedder
from .errors import DatasetError
from .eval_duplicates import DuplicatesReport, DuplicatesResult, eval_duplicates, read_groups
from .eval_embed import RAW_PIXELS, embed_arrays, embed_files, load_models
from .eval_report import ModelRun, Report, choose_images, folder_images, progress_steps
from .metrics import KnnScores, RetrievalScores, knn_scores, single_target_scores, target_ranks
from .sources import DEFAULT_MODEL
from .walk import walk_images

ALL = "all"  # the row of every copy together
DATASETS = ("fashion-mnist",)


# --- copy detection -------------------------------------------------------------------------


@dataclass
class CopiesResult:
    """One model's copy detection: ``scores[kind]``, and ``scores["all"]`` over every copy."""

    model: str
    scores: dict[str, RetrievalScores]
    run: ModelRun


@dataclass
class CopiesReport(Report):
    """Copies of ``originals`` images searched among ``gallery`` images (originals and the
    distractors); ``skipped`` lists the files (originals or copies) that could not be read."""

    folder: str
    transforms: str
    seed: int
    originals: int
    gallery: int
    kinds: list[str]
    results: list[CopiesResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def eval_copies(
    folder: str | Path,
    models: Sequence[Embedder | str | os.PathLike] = (DEFAULT_MODEL,),
    *,
    n: int = 100,
    seed: int = 0,
    transforms: str = "standard",
    copies_of: str | None = None,
    backend: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> CopiesReport:
    """Copy-detection recall@1/5/10 and mAP of each model, per edit kind.

    Edited copies of ``n`` images of ``folder`` (seeded by ``seed``; see
    :mod:`mocoretrieval.edits`) each search every image of the folder; the right answer is the
    image the copy was made from.

    Args:
        folder: photos, searched recursively; the rest of the folder are distractors.
        models: model sources or encoders (see :func:`~mocoretrieval.eval_embed.load_models`).
        n: number of images to make copies of.
        seed: the choice of images and every edit's parameters.
        transforms: ``light``, ``standard`` or ``strong`` (docs/eval.md).
        copies_of: a sub-folder of ``folder``: copies are made of its images only, and the
            rest of the folder are distractors (e.g. held-out photos among other pictures).
        backend, device, quantize, batch_size, workers, notify: as for ``index``.
        progress: called with (images done, images in all) after each batch.
    """
    preset = get_preset(transforms)
    files = folder_images(folder)
    order = choose_images(files, n, seed)
    if copies_of:
        prefix = Path(copies_of).as_posix().strip("/") + "/"
        order = [f for f in order if f.startswith(prefix)]
        if not order:
            raise DatasetError(f"no images under {Path(folder) / copies_of} to make copies of")
    encoders = load_models(
        models,
        backend=backend,
        device=device,
        quantize=quantize,
        calibration_images=[Path(folder) / f for f in files],
        calibrated_on=str(Path(folder).resolve()),
        notify=notify,
    )
    with tempfile.TemporaryDirectory(prefix="mocoretrieval-copies-") as tmp:
        copies, _ = make_copies(folder, order, tmp, transforms, seed, limit=n)
        kind_of = {c.path: c for c in copies}
        step = progress_steps(progress, (len(files) + len(copies)) * len(encoders))
        results: list[CopiesResult] = []
        skipped: list[tuple[str, str]] = []  # the folder's files (unreadable originals too)
        for name, encoder in encoders:
            start = time.perf_counter()
            common = {"batch_size": batch_size, "workers": workers, "device": device}
            gallery = embed_files(encoder, folder, files, progress=step, **common)
            queries = embed_files(
                encoder, tmp, [c.path for c in copies], reuse=False, progress=step, **common
            )
            if not results:  # every model reads the same files: list them once
                skipped += gallery.skipped + [
                    (f"{kind_of[p].kind} copy of {kind_of[p].original}", why)
                    for p, why in queries.skipped
                ]
            row = {p: i for i, p in enumerate(gallery.paths)}
            # A copy whose original the pipeline could not read has nothing to find.
            keep = [i for i, p in enumerate(queries.paths) if kind_of[p].original in row]
            targets = np.array([row[kind_of[queries.paths[i]].original] for i in keep], np.int64)
            better, tied = target_ranks(queries.vectors[keep], gallery.vectors, targets)
            kinds = np.array([kind_of[queries.paths[i]].kind for i in keep])
            scores = {
                k: single_target_scores(better[kinds == k], tied[kinds == k])
                for k in kinds_of(preset)
            }
            scores[ALL] = single_target_scores(better, tied)
            run = ModelRun(
                len(gallery.skipped) + len(queries.skipped),
                gallery.reused,
                time.perf_counter() - start,
            )
            results.append(CopiesResult(name, scores, run))
    return CopiesReport(
        str(folder),
        transforms,
        seed,
        len({c.original for c in copies}),
        len(files) - len(set(files) & {path for path, _ in skipped}),
        [*kinds_of(preset), ALL],
        results,
        skipped,
    )


# --- kNN on labeled images ------------------------------------------------------------------


@dataclass
class KnnResult:
    model: str
    scores: KnnScores
    run: ModelRun


@dataclass
class KnnReport(Report):
    """Weighted kNN of ``queries`` labeled images against a ``bank`` (None: leave-one-out)."""

    source: str
    classes: list[str]
    queries: int
    bank: int | None
    ks: list[int]
    results: list[KnnResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def labeled_files(folder: str | Path) -> tuple[list[str], list[int], list[str]]:
    """``(files, labels, classes)`` of a folder with one sub-folder per class.

    Raises:
        DatasetError: fewer than two classes, or a class with a single image.
    """
    files = [f for f in walk_images(folder) if "/" in f]
    classes = sorted({f.split("/", 1)[0] for f in files})
    if len(classes) < 2:
        raise DatasetError(
            f"{folder} has {len(classes)} class(es); kNN needs one sub-folder per class, at "
            "least two, each with two images or more"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[f.split("/", 1)[0]] for f in files]
    _check_class_sizes(labels, classes, folder)
    return files, labels, classes


def _check_class_sizes(labels: Sequence[int], classes: Sequence[str], where: Any) -> None:
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(classes))
    lonely = [classes[i] for i in np.nonzero(counts < 2)[0]]
    if lonely:
        raise DatasetError(
            f"class(es) {', '.join(lonely)} of {where} have fewer than two readable images: "
            "leave-one-out kNN needs two or more per class; add images or remove the folder"
        )


def eval_knn(
    folder: str | Path | None = None,
    models: Sequence[Embedder | str | os.PathLike] = (DEFAULT_MODEL,),
    *,
    dataset: str | None = None,
    ks: Sequence[int] = (20, 200),
    limit: int | None = None,
    backend: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> KnnReport:
    """Weighted kNN accuracy (T = 0.1), same-class recall@k and MAP@R of each model.

    The raw-pixel baseline is always evaluated first, so every number has a floor.

    Args:
        folder: one sub-folder of images per class; leave-one-out over all of them.
        models: model sources or encoders.
        dataset: instead of a folder, ``fashion-mnist`` (Debian's dataset-fashion-mnist):
            the training images as the bank, the test images as queries.
        ks: neighbours of the vote, one accuracy each.
        limit: with a dataset, use the first ``limit`` images of each split.
        backend, device, quantize, batch_size, workers, notify, progress: as for copies.
    """
    if (folder is None) == (dataset is None):
        raise DatasetError("pass either a labeled folder or --dataset fashion-mnist")
    if any(k < 1 for k in ks):
        raise DatasetError(f"-k values must be at least 1, got {list(ks)}")
    models = [RAW_PIXELS, *(m for m in models if m != RAW_PIXELS)]
    if dataset is not None:
        return _knn_dataset(dataset, models, ks, limit, backend, device, quantize, progress, notify)
    files, labels, classes = labeled_files(folder)
    label_of = dict(zip(files, labels))
    encoders = load_models(
        models,
        backend=backend,
        device=device,
        quantize=quantize,
        calibration_images=[Path(folder) / f for f in files],
        calibrated_on=str(Path(folder).resolve()),
        notify=notify,
    )
    step = progress_steps(progress, len(files) * len(encoders))
    results, skipped = [], []
    for name, encoder in encoders:
        start = time.perf_counter()
        got = embed_files(
            encoder,
            folder,
            files,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=step,
        )
        y = np.array([label_of[p] for p in got.paths], np.int64)
        _check_class_sizes(y, classes, folder)
        if not results:
            skipped = got.skipped
        scores = knn_scores(got.vectors, y, ks=ks)
        run = ModelRun(len(got.skipped), got.reused, time.perf_counter() - start)
        results.append(KnnResult(name, scores, run))
    return KnnReport(
        str(folder), classes, len(files) - len(skipped), None, list(ks), results, skipped
    )


def _knn_dataset(dataset, models, ks, limit, backend, device, quantize, progress, notify):
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    from .datasets import FASHION_MNIST_CLASSES, fashion_mnist

    bank, bank_y = fashion_mnist("train", limit=limit)
    queries, query_y = fashion_mnist("test", limit=limit)
    bank_px, query_px = bank[:, 0].numpy(), queries[:, 0].numpy()  # (N, 28, 28) uint8
    encoders = load_models(
        models,
        backend=backend,
        device=device,
        quantize=quantize,
        calibration_images=None,  # int8 on Fashion-MNIST would need image files: refused
        notify=notify,
        raw_size=28,  # Fashion-MNIST's own pixels
    )
    step = progress_steps(progress, (len(bank_px) + len(query_px)) * len(encoders))
    results = []
    for name, encoder in encoders:
        start = time.perf_counter()
        b = embed_arrays(encoder, bank_px, progress=step)
        q = embed_arrays(encoder, query_px, progress=step)
        scores = knn_scores(q, query_y.numpy(), b, bank_y.numpy(), ks=ks)
        results.append(KnnResult(name, scores, ModelRun(seconds=time.perf_counter() - start)))
    return KnnReport(
        dataset, list(FASHION_MNIST_CLASSES), len(query_px), len(bank_px), list(ks), results
    )


__all__ = [
    "ALL",
    "COMBINED",
    "CopiesReport",
    "CopiesResult",
    "DuplicatesReport",
    "DuplicatesResult",
    "KnnReport",
    "KnnResult",
    "ModelRun",
    "eval_copies",
    "eval_duplicates",
    "eval_knn",
    "labeled_files",
    "read_groups",
]
