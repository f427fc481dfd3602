"""`mocoretrieval eval copies|knn|duplicates`: wiring over :mod:`mocoretrieval.evaluate` and
its tables."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from .cli_common import Progress, add_backend_arguments, notify
from .metrics import KNN_TEMPERATURE, RECALL_KS, RetrievalScores
from .sources import DEFAULT_MODEL

_METRICS = [f"R@{k}" for k in RECALL_KS] + ["mAP"]


def _row(scores: RetrievalScores) -> list[float]:
    return [scores.recall[k] for k in RECALL_KS] + [scores.mean_ap]


def _cells(values: list[float]) -> str:
    return " ".join("   nan" if math.isnan(v) else f"{v:6.3f}" for v in values)


def _legend(names: list[str]) -> list[str]:
    return [f"  [{i}] {name}" for i, name in enumerate(names, 1)]


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):")
    for path, reason in skipped[:10]:
        print(f"  {path}: {reason}")
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more")


def _run(args: argparse.Namespace, evaluate: Any, **kwargs: Any) -> Any:
    progress = Progress(args.quiet or args.json)
    try:
        return evaluate(
            models=args.model or [DEFAULT_MODEL],
            backend=args.backend,
            device=args.device,
            quantize=args.quantize,
            progress=progress,
            notify=None if args.quiet or args.json else notify,
            **kwargs,
        )
    finally:
        progress.close()


def _cmd_copies(args: argparse.Namespace) -> int:
    from .evaluate import eval_copies

    report = _run(
        args,
        eval_copies,
        folder=args.folder,
        n=args.n,
        seed=args.seed,
        transforms=args.transforms,
        copies_of=args.copies_of,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    names = [r.model for r in report.results]
    print(
        f"copy detection: {report.originals} images, one copy per edit ({report.transforms}, "
        f"seed {report.seed}), each searched among {report.gallery} images"
    )
    print(*_legend(names), sep="\n")
    width = 6 * len(_METRICS) + len(_METRICS) - 1
    groups = "".join(f" | {f'[{i}]':^{width}}" for i in range(1, len(names) + 1))
    print(f"{'':<10}{groups}".rstrip())
    print(f"{'edit':<10}" + f" | {' '.join(f'{m:>6}' for m in _METRICS)}" * len(names))
    for kind in report.kinds:
        cells = "".join(f" | {_cells(_row(r.scores[kind]))}" for r in report.results)
        print(f"{kind:<10}{cells}")
    _print_skipped(report.skipped)
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    from .evaluate import eval_knn

    report = _run(
        args,
        eval_knn,
        folder=args.folder,
        dataset=args.dataset,
        ks=args.k,
        limit=args.limit,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    against = f"against {report.bank} training images" if report.bank else "leave-one-out"
    print(
        f"kNN on {report.source}: {report.queries} images of {len(report.classes)} classes, "
        f"{against} (weighted vote, T={KNN_TEMPERATURE})"
    )
    heads = [f"acc@{k}" for k in report.ks] + [f"R@{k}" for k in RECALL_KS] + ["MAP@R"]
    print(f"{'model':<6} " + " ".join(f"{h:>7}" for h in heads))
    for i, r in enumerate(report.results, 1):
        values = [r.scores.accuracy[k] for k in report.ks] + _row(r.scores.retrieval)
        print(f"{f'[{i}]':<6} " + " ".join(f"{v:7.4f}" for v in values))
    print(*_legend([r.model for r in report.results]), sep="\n")
    _print_skipped(report.skipped)
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from .eval_plots import plot_precision_recall
    from .evaluate import eval_duplicates

    report = _run(
        args,
        eval_duplicates,
        folder=args.folder,
        groups=args.groups,
        n=args.n,
        seed=args.seed,
        draws=args.draws,
        transforms=args.transforms,
        target_precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    plot = plot_precision_recall(report, args.plot)
    if args.json:
        print(json.dumps({**report.to_dict(), "plot": str(plot)}, indent=2))
        return 0
    print(
        f"duplicates among {report.images} images, {report.positives} known duplicate pairs "
        f"({report.groups_from})"
    )
    target, default = report.target_precision, report.default_threshold
    print(f"{'model':<6} {f'threshold for precision >= {target}':>32}  {f'at {default}':>17}")
    print(
        f"{'':<6} {'threshold':>12} {'precision':>9} {'recall':>9}  {'precision':>9} {'recall':>7}"
    )
    for i, r in enumerate(report.results, 1):
        if r.recommended is None:
            best = f"{'never reached':>32}"
        else:
            p, rec = r.at_recommended
            best = f"{r.recommended:12.4f} {p:9.3f} {rec:9.3f}"
        print(f"{f'[{i}]':<6} {best}  {r.at_default[0]:9.3f} {r.at_default[1]:7.3f}")
    print(*_legend([r.model for r in report.results]), sep="\n")
    print(f"precision-recall curve: {plot}")
    _print_skipped(report.skipped)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        metavar="SOURCE",
        help=f"encoder to evaluate, repeat to compare (default {DEFAULT_MODEL}, as for index); "
        "'raw-pixels' is the pixels themselves",
    )
    add_backend_arguments(p)
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="also evaluate each model as a static int8 onnxruntime model, side by side",
    )
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 (default: automatic)")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    p.add_argument("--workers", type=int, help="decoding processes (default: automatic)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _copies_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=100, help="images to make copies of (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and edits (default 0)")
    p.add_argument(
        "--transforms",
        choices=("light", "standard", "strong"),
        default="standard",
        help="edit strength (default standard; docs/eval.md has each preset's ranges)",
    )


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure encoders: copy detection, kNN on labeled images, duplicates",
        description="How good an encoder is at retrieval, on your own images.",
    )
    tasks = p.add_subparsers(dest="task", required=True)

    c = tasks.add_parser(
        "copies",
        help="recall@1/5/10 and mAP of finding edited copies among a folder",
        description="Seeded edited copies (crop, downscale, JPEG, colour, grayscale, flip, "
        "rotation, overlay for strong) of --n images each search the whole folder.",
    )
    c.add_argument("folder", help="folder of photos; those not copied are distractors")
    _copies_options(c)
    c.add_argument(
        "--copies-of",
        metavar="SUBFOLDER",
        help="make copies only of the images under this sub-folder of FOLDER; the rest of "
        "FOLDER are distractors",
    )
    _common(c)
    c.set_defaults(func=_cmd_copies)

    k = tasks.add_parser(
        "knn",
        help="weighted kNN accuracy, same-class recall@k and MAP@R on labeled images",
        description="Leave-one-out weighted kNN (InstDisc/MoCo protocol, T=0.1) over a "
        "folder with one sub-folder per class, or --dataset fashion-mnist (train as the "
        "bank, test as queries). A raw-pixel baseline row is always printed.",
    )
    k.add_argument("folder", nargs="?", help="one sub-folder of images per class")
    k.add_argument("--dataset", choices=("fashion-mnist",), help="a dataset instead of a folder")
    k.add_argument("-k", type=int, nargs="+", default=[20, 200], help="neighbours (default 20 200)")
    k.add_argument("--limit", type=int, help="with --dataset: first N images of each split")
    _common(k)
    k.set_defaults(func=_cmd_knn)

    d = tasks.add_parser(
        "duplicates",
        help="precision and recall of `duplicates` over thresholds, and the threshold to use",
        description="Against known groups (generated copies, or --groups CSV of path,group), "
        "the precision and recall of `duplicates` at every threshold; recommends the threshold "
        "for a target precision and draws the precision-recall curve to a PNG.",
    )
    d.add_argument("folder", help="folder of photos")
    d.add_argument("--groups", metavar="CSV", help="path,group rows (paths relative to FOLDER)")
    d.add_argument("--precision", type=float, default=0.95, help="target precision (default 0.95)")
    d.add_argument(
        "--plot", default="eval-duplicates.png", help="PNG to write (default eval-duplicates.png)"
    )
    _copies_options(d)
    d.add_argument(
        "--draws",
        type=int,
        default=1,
        help="independent draws of the copies (seeds SEED to SEED+DRAWS-1), their pairs pooled "
        "into one curve (default 1)",
    )
    _common(d)
    d.set_defaults(func=_cmd_duplicates)
