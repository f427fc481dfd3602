"""The `mocoretrieval` command: wiring over the library, nothing more.

Each subcommand is a small `_cmd_*` function; `main` parses, dispatches, and turns a
`MoCoRetrievalError` into one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .cli_common import INDEX_HELP as _INDEX_HELP
from .cli_common import Progress, add_backend_arguments, notify
from .cli_common import shown as _shown
from .cli_dedupe import add_duplicates as _add_duplicates
from .cli_dedupe import add_undo as _add_undo
from .cli_export import add_export_embeddings as _add_export_embeddings
from .cli_models import add_convert as _add_convert
from .cli_models import add_export_onnx as _add_export_onnx
from .cli_roots import add_roots as _add_roots
from .cli_roots import known_roots, print_roots
from .cli_watch import add_watch as _add_watch
from .errors import MoCoRetrievalError

if TYPE_CHECKING:
    from .search import SearchResult
    from .sharded_embedding import ShardedEmbedding


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.server import serve

    serve(
        args.index,
        host=args.host,
        port=args.port,
        share=args.share,
        k=args.k,
        backend=args.backend,
        max_upload_mb=args.max_upload_mb,
        device=args.device,
        notify=notify,
        api_only=args.api_only,
    )
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="the image-search web app and its HTTP API over an index",
        description="Search an index from the browser: upload or paste a photo, see its "
        "nearest images, browse near-duplicates. The same server answers JSON under /api/v1 "
        "(README, 'HTTP API'). Local only unless --host/--share say otherwise.",
    )
    p.add_argument(
        "--index",
        metavar="DIR",
        help="index directory or indexed folder "
        "(default: found in the current folder or its parents)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("-k", type=int, default=10, help="results shown at first (default 10)")
    p.add_argument("--device", help="torch device for the model (default: automatic)")
    add_backend_arguments(p)
    p.add_argument("--max-upload-mb", type=float, default=50, help="upload limit (default 50)")
    p.add_argument(
        "--api-only",
        action="store_true",
        help="serve the HTTP API (/api/v1) without the page, e.g. on a NAS; needs no Gradio",
    )
    p.set_defaults(func=_cmd_serve)


# --- the main job: index, search, duplicates, info ------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cmd_index(args: argparse.Namespace) -> int:
    from .ranks import launched_by_torchrun

    if launched_by_torchrun():  # every rank embeds a share; rank 0 merges and reports
        from .cli_distributed import index_on_ranks

        return index_on_ranks(args, _index_folder)
    return _index_folder(args)


def _index_folder(args: argparse.Namespace, step: ShardedEmbedding | None = None) -> int:
    from .cli_distributed import leftover_shards
    from .models import open_index

    exclude = args.exclude if args.exclude is not None else [] if args.no_exclude else None
    roots = args.roots or known_roots(args.index)  # no ROOT: every root of the index
    index = open_index(
        args.index,
        root=roots[0] if len(roots) == 1 else roots,
        model=args.model,
        backend=args.backend,
        device=args.device,
        quantize=args.quantize,
        notify=None if args.quiet else notify,
        index_type=args.index_type,
        rebuild=args.rebuild,
        store_dtype=args.store_dtype,
        exclude=exclude,  # int8 calibration leaves out what the update will
    )
    step = step or leftover_shards(index.path, args)  # an interrupted torchrun's, to merge
    progress = Progress(args.quiet)
    try:
        report = index.update(
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            progress=progress,
            prune_empty=args.prune_empty,
            exclude=exclude,
            embed_step=step,
        )
    finally:
        progress.close()
    info = index.info()
    where = ", ".join(str(r.path) for r in index.roots)
    print(f"indexed {where} into {index.path}: {info['count']} images, {info['index_type']}")
    if step is not None:
        print(f"  {step.summary()}")
    print(
        f"added {len(report.added)}, updated {len(report.updated)}, removed "
        f"{len(report.removed)}, skipped {report.num_skipped} in {report.seconds:.1f} s "
        f"({report.images_per_s:.1f} images/s)"
    )
    shown = 0
    for reason, paths in sorted(report.skipped.items()):
        for path in paths:
            if shown < 20:
                print(f"  skipped {path}: {reason}")
            shown += 1
    if shown > 20:
        print(f"  ... and {shown - 20} more: see `mocoretrieval info`")
    files, folders = report.num_excluded
    if files or folders:
        print(
            f"  excluded {_count(files, 'image')} and {_count(folders, 'folder')} (not entered) "
            "by the ignore rules: see `mocoretrieval info`"
        )
    if report.excluded_removed:
        print(
            f"  removed {_count(len(report.excluded_removed), 'image')} from the index that the "
            "ignore rules now exclude (the files are not touched; change the rules and index "
            "again to add them back)"
        )
    for root in report.added_roots:
        print(f"  added the root {root} to the library")
    for root, (reason, n) in report.offline.items():
        print(
            f"  root {root} is offline ({reason}): its {_count(n, 'indexed image')} are kept; "
            "`mocoretrieval roots move` if it moved, `roots remove` to forget it"
        )
    for folder, reason in report.unreadable.items():
        print(f"  could not list {folder}/ ({reason}); its indexed images are kept")
    whole = {".", *(r.name for r in index.roots)}  # a whole root: said offline above
    for folder, n in report.empty.items():
        if folder in whole and report.offline:
            continue
        shown_folder = index.root if folder == "." else f"{folder}/"
        print(
            f"  {shown_folder} is empty but held {n} indexed images: kept (an unmounted "
            "drive?); if they were deleted, forget them with --prune-empty"
        )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .models import open_index

    index = open_index(args.index, backend=args.backend, device=args.device, notify=notify)
    results = index.search_batch(args.images, k=args.k)
    if args.json:
        out = [
            {"query": q, "results": [_result_json(r) for r in rs]}
            for q, rs in zip(args.images, results)
        ]
        print(json.dumps(out, indent=2))
        return 0
    for q, rs in zip(args.images, results):
        print(f"{q}:")
        print(f"  {'rank':>4}  {'score':>6}  path")
        for rank, r in enumerate(rs, 1):
            at = "" if r.timestamp is None else f" @ {r.timestamp:.1f}s"  # a video's keyframe
            print(f"  {rank:>4}  {r.score:6.4f}  {_shown(r.path)}{at}")
    return 0


def _result_json(r: SearchResult) -> dict[str, object]:
    """A search hit for ``--json``; ``timestamp`` only for a video's keyframe."""
    out: dict[str, object] = {"path": r.path, "score": round(r.score, 6)}
    if r.timestamp is not None:
        out["timestamp"] = round(r.timestamp, 3)
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import open_index

    info = open_index(args.index).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    skipped = info.pop("skipped")
    excluded = info.pop("excluded")
    roots = info.pop("roots")
    info["exclude"] = " ".join(info["exclude"]) or "-"
    for key, value in info.items():
        print(f"{key + ':':<22}{value}")
    print(f"{'roots:':<22}{len(roots)}")
    print_roots(roots)
    counts = [(s, p, c) for s, patterns in excluded.items() for p, c in patterns.items()]
    files = sum(c["files"] for _, _, c in counts)
    folders = sum(c["folders"] for _, _, c in counts)
    print(f"{'excluded:':<22}{_count(files, 'image')}, {_count(folders, 'folder')} (not entered)")
    for source, pattern, c in counts:
        what = [
            _count(c[k], noun) for k, noun in (("files", "image"), ("folders", "folder")) if c[k]
        ]
        print(f"  {source}: {pattern}: {', '.join(what)}")
    print(f"{'skipped:':<22}{len(skipped)}")
    for path, reason in skipped.items():
        print(f"  {path}: {reason}")
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="index (or update the index of) one or several folders of images",
        description="Embed every image under each ROOT and build a FAISS index. Re-run it as "
        "photos come and go: only new and changed files are embedded, deleted ones are removed, "
        "and an interrupted run continues where it stopped. Several ROOTs make one library "
        "(--index DIR required); a ROOT the index does not cover yet is added to its roots, "
        "and without ROOT every root of the index is updated. A root whose folder is missing, "
        "or empty while the index holds images of it, is offline: its images are kept.",
    )
    p.add_argument(
        "roots", nargs="*", metavar="ROOT", help="folders of images (default: the index's roots)"
    )
    p.add_argument(
        "--index",
        metavar="DIR",
        help="index directory (default ROOT/.mocoretrieval for one ROOT; without ROOT, found "
        "here or in a parent folder)",
    )
    p.add_argument(
        "--model",
        metavar="SOURCE",
        help="encoder: alias, directory, Hub id or checkpoint (default: the index's model, or "
        "the shipped moco-v2-r18-photos for a new index; --model moco-v3-r50-1000ep for the "
        "official ResNet-50, a download)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per forward pass (default: 8 with torch on a CPU, where it runs fastest; "
        "32 otherwise)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="decoding processes (default: automatic). 0 decodes in this process; a file stuck "
        "there for 60 s is skipped and its decoding thread left running until the command ends "
        "(a process would be killed)",
    )
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 (default: automatic)")
    p.add_argument(
        "--index-type",
        metavar="FACTORY",
        help="FAISS factory string, e.g. Flat, IVF4096,Flat, HNSW32,Flat (default: exact search "
        "up to 50k images, then IVF with PQ fast-scan codes re-ranked exactly, tuned for "
        "recall@10 >= 0.95)",
    )
    p.add_argument("--rebuild", action="store_true", help="forget every embedding and start over")
    p.add_argument(
        "--store-dtype",
        choices=("float32", "float16"),
        help="how the index stores the vectors: float32 (the default for a new index) or float16, "
        "half the disk for large collections; searches read float32 back. Kept for later runs; "
        "changing it re-embeds everything and needs --rebuild",
    )
    p.add_argument(
        "--prune-empty",
        action="store_true",
        help="also forget the images of folders that are now empty; by default an empty folder "
        "(ROOT too) that held indexed images is taken for an unmounted drive and they are kept",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave out what a gitignore-style PATTERN matches, relative to each ROOT (repeat it for "
        "more); kept in the index for later runs until given again or --no-exclude. Images it "
        "now excludes are removed from the index (not from the disk). .mocoretrievalignore "
        "files in the tree apply too, over these",
    )
    p.add_argument("--no-exclude", action="store_true", help="drop the index's --exclude patterns")
    add_backend_arguments(p)
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="embed with a static int8 onnxruntime model, calibrated once on a sample of ROOT "
        "(faster on CPUs with VNNI; see benchmarks/RESULTS.md for its recall)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="find the images most similar to query images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--index", metavar="DIR", help=_INDEX_HELP)
    p.add_argument("--device", help="torch device for the model (default: automatic)")
    add_backend_arguments(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print [{"query", "results": [{"path", "score"}]}] instead of a table',
    )
    p.set_defaults(func=_cmd_search)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="model, size, index type, last update, skipped and excluded files"
    )
    p.add_argument("--index", metavar="DIR", help=_INDEX_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_cmd_info)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .cli_eval import add_eval  # its own file: three tasks and their tables

    add_eval(sub)


# Subcommand registrars, in the order `--help` lists them. Features add theirs here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert,
    _add_export_onnx,
    _add_index,
    _add_watch,
    _add_search,
    _add_duplicates,
    _add_undo,
    _add_info,
    _add_export_embeddings,
    _add_roots,
    _add_eval,
    _add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mocoretrieval", description="Image search with self-supervised MoCo encoders."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MoCoRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; work committed so far is kept, re-run to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mocoretrieval duplicates | head`: the reader left early
        # Point stdout at /dev/null so that Python's exit-time flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
