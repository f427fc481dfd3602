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

from .cli_common import Progress, add_backend_arguments, notify
from .errors import MoCoRetrievalError

if TYPE_CHECKING:
    from .dedupe import ApplyReport, Proposal
    from .index import DuplicateGroup, ImageIndex


def _cmd_convert(args: argparse.Namespace) -> int:
    from .sources import convert

    encoder = convert(args.source, args.out_dir)
    print(f"wrote MoCo {encoder.moco_version} {encoder.arch} ({encoder.dim}-d) to {args.out_dir}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (or any model source) to the save_pretrained layout",
        description="Load any source MoCoEncoder.from_pretrained accepts and write it as "
        "config.json + model.safetensors + README.md, ready for push_to_hub.",
    )
    p.add_argument("source", help="official .pth.tar, alias, directory or Hub id")
    p.add_argument("out_dir", help="directory to write")
    p.set_defaults(func=_cmd_convert)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx, sidecar_path
    from .sources import load

    encoder = load(args.source)
    path = export_onnx(encoder, args.out, opset=args.opset)
    print(
        f"wrote {path} and {sidecar_path(path).name}: {encoder.arch}, {encoder.dim}-d, opset "
        f"{args.opset}; load it with mocoretrieval.OnnxEncoder.from_file"
    )
    return 0


def _add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export an encoder to one ONNX file for onnxruntime",
        description="Load any source MoCoEncoder.from_pretrained accepts and write OUT.onnx "
        "(dynamic batch, L2-normalised embeddings) plus OUT.onnx.json; the preprocessing config "
        "and weights hash travel inside the file too, so it is usable on its own.",
    )
    p.add_argument("source", help="official .pth.tar, alias, directory or Hub id")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.set_defaults(func=_cmd_export_onnx)


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


def _shown(path: str) -> str:
    """A result path as the table shows it: relative to the current folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cmd_index(args: argparse.Namespace) -> int:
    from .models import open_index

    index = open_index(
        args.index,
        root=args.root,
        model=args.model,
        backend=args.backend,
        device=args.device,
        quantize=args.quantize,
        notify=None if args.quiet else notify,
        index_type=args.index_type,
        rebuild=args.rebuild,
    )
    exclude = args.exclude if args.exclude is not None else [] if args.no_exclude else None
    progress = Progress(args.quiet)
    try:
        report = index.update(
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            progress=progress,
            prune_empty=args.prune_empty,
            exclude=exclude,
        )
    finally:
        progress.close()
    info = index.info()
    print(f"indexed {index.root} into {index.path}: {info['count']} images, {info['index_type']}")
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
    for folder, reason in report.unreadable.items():
        print(f"  could not list {folder}/ ({reason}); its indexed images are kept")
    for folder, n in report.empty.items():
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
            {"query": q, "results": [{"path": r.path, "score": round(r.score, 6)} for r in rs]}
            for q, rs in zip(args.images, results)
        ]
        print(json.dumps(out, indent=2))
        return 0
    for q, rs in zip(args.images, results):
        print(f"{q}:")
        print(f"  {'rank':>4}  {'score':>6}  path")
        for rank, r in enumerate(rs, 1):
            print(f"  {rank:>4}  {r.score:6.4f}  {_shown(r.path)}")
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from . import dedupe
    from .models import open_index

    if args.dry_run and not (args.move_to or args.trash):
        raise MoCoRetrievalError("--dry-run goes with --move-to DIR or --trash")
    index = open_index(args.index)
    if args.not_duplicates:
        return _not_duplicates(index, args)
    progress = Progress(quiet=args.json)
    try:
        groups = index.duplicates(args.threshold, similar=args.similar, progress=progress)
    finally:
        progress.close()
    proposals = dedupe.suggest(groups, args.keep, args.reference or (), index.root)
    if args.move_to or args.trash:
        report = dedupe.apply(
            index, proposals, move_to=args.move_to, trash=args.trash, dry_run=args.dry_run
        )
        return _print_cleanup(report, args)
    if args.json:
        print(json.dumps([_group_json(g, p) for g, p in zip(groups, proposals)], indent=2))
        return 0
    for i, (group, proposal) in enumerate(zip(groups, proposals), 1):
        print(f"group {i}: {len(group)} images, {group.tier} (id {group.id})")
        for r in group:
            mark = "keep" if r.path in proposal.keep else "remove"
            print(f"  {r.score:6.4f}  {mark:<6}  {_shown(r.path)}")
        if proposal.note:
            print(f"  ({proposal.note})")
    tiers = ", ".join(f"{sum(g.tier == t for g in groups)} {t}" for t in ("identical", "near"))
    if args.similar is not None:
        tiers += f", {sum(g.tier == 'similar' for g in groups)} similar (>= {args.similar})"
    print(f"{len(groups)} groups of near-duplicates (similarity >= {args.threshold}): {tiers}")
    return 0


def _group_json(group: DuplicateGroup, proposal: Proposal) -> dict:
    return {
        "id": group.id,
        "tier": group.tier,
        "keep": proposal.keeper,
        "files": [
            {
                "path": r.path,
                "score": round(r.score, 6),
                "action": "keep" if r.path in proposal.keep else "remove",
            }
            for r in group
        ],
    }


def _not_duplicates(index: ImageIndex, args: argparse.Namespace) -> int:
    """``--not-duplicates PATH PATH...`` or ``--not-duplicates ID``: recorded in the index."""
    names = args.not_duplicates
    if len(names) == 1:  # a group id, from a listing with the same thresholds
        groups = index.duplicates(args.threshold, similar=args.similar)
        match = [g for g in groups if g.id == names[0]]
        if not match:
            raise MoCoRetrievalError(
                f"no group {names[0]!r} at these thresholds: pass its id as `duplicates` lists "
                "it (same --threshold/--similar), or two or more paths"
            )
        names = match[0].relpaths
    pairs = index.mark_not_duplicates(names)
    print(f"recorded {len(pairs)} pair(s) as not duplicates; they will not be grouped again")
    return 0


def _print_cleanup(report: ApplyReport, args: argparse.Namespace) -> int:
    verb, done = ("trash", "trashed") if args.trash else ("move", "moved")
    steps = report.steps
    if args.dry_run:
        for step in steps:
            print(
                f"would {verb} {_shown(step.src)}" + (f" -> {_shown(step.dst)}" if step.dst else "")
            )
        print(f"dry run: {len(steps)} files would be {done}; nothing was touched")
        return 0
    if not steps:
        print("nothing to clean up")
        return 0
    for src, why in report.failed.items():
        print(f"left in place: {_shown(src)}: {why}", file=sys.stderr)
    moved = report.moved
    print(
        f"{done} {len(moved)} of {len(steps)} files; {report.index_note}. Journal: "
        f"{report.journal}; `mocoretrieval undo` puts them back"
    )
    return 1 if report.failed else 0


def _cmd_undo(args: argparse.Namespace) -> int:
    from .dedupe import undo
    from .layout import find_index_dir

    report = undo(find_index_dir(args.index))
    for path, why in report.problems.items():
        print(f"not restored: {_shown(path)}: {why}", file=sys.stderr)
    print(
        f"restored {len(report.restored)} files from {report.journal}"
        + ("; run `mocoretrieval index` to index them again" if report.restored else "")
    )
    return 1 if report.problems else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import open_index

    info = open_index(args.index).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    skipped = info.pop("skipped")
    excluded = info.pop("excluded")
    info["exclude"] = " ".join(info["exclude"]) or "-"
    for key, value in info.items():
        print(f"{key + ':':<22}{value}")
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


_INDEX_HELP = "index directory or indexed folder (default: found here or in a parent folder)"


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="index (or update the index of) a folder of images",
        description="Embed every image under ROOT and build a FAISS index. Re-run it as photos "
        "come and go: only new and changed files are embedded, deleted ones are removed, and an "
        "interrupted run continues where it stopped.",
    )
    p.add_argument("root", help="the folder of images")
    p.add_argument("--index", metavar="DIR", help="index directory (default ROOT/.mocoretrieval)")
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
        "--prune-empty",
        action="store_true",
        help="also forget the images of folders that are now empty; by default an empty folder "
        "(ROOT too) that held indexed images is taken for an unmounted drive and they are kept",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="leave out what a gitignore-style PATTERN matches, relative to ROOT (repeat it for "
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


def _add_duplicates(sub: argparse._SubParsersAction) -> None:
    from .dedupe import KEEP_RULES
    from .duplicates import DEFAULT_DUPLICATE_THRESHOLD

    p = sub.add_parser(
        "duplicates",
        help="groups of duplicate images in an index; move or trash the extra copies",
        description="List groups of duplicates, each with its tier (identical bytes, near, "
        "similar) and the copy suggested to keep. --move-to DIR or --trash removes the other "
        "copies, journaled: `mocoretrieval undo` puts every file back.",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_DUPLICATE_THRESHOLD,
        help=f"cosine similarity that makes a pair near-duplicates (default "
        f"{DEFAULT_DUPLICATE_THRESHOLD})",
    )
    p.add_argument(
        "--similar",
        type=float,
        metavar="T",
        help="also group images at similarity >= T (lower than --threshold), tier 'similar'",
    )
    p.add_argument(
        "--keep",
        default="largest",
        metavar="RULE",
        help=f"which copy each group keeps: {', '.join(KEEP_RULES)} (most pixels, then bytes; "
        "the default) or a path pattern such as '*/originals/*': the first file matching it",
    )
    p.add_argument(
        "--reference",
        action="append",
        metavar="DIR",
        help="a folder whose files are never moved or trashed (repeatable)",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--move-to",
        metavar="DIR",
        help="move the copies not kept into DIR (outside the indexed folder), same subfolders",
    )
    action.add_argument("--trash", action="store_true", help="send them to the trash")
    action.add_argument(
        "--not-duplicates",
        nargs="+",
        metavar="PATH",
        help="record that these images (or the group with this id) are not duplicates: they "
        "are never grouped together again",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would move; touch nothing")
    p.add_argument("--index", metavar="DIR", help=_INDEX_HELP)
    p.add_argument(
        "--json",
        action="store_true",
        help='print [{"id", "tier", "keep", "files": [{"path", "score", "action"}]}, ...]',
    )
    p.set_defaults(func=_cmd_duplicates)


def _add_undo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "undo",
        help="put back the files of the last `duplicates --move-to/--trash`",
        description="Replays the latest clean-up journal backwards: every moved or trashed file "
        "returns to its original path, never over another file.",
    )
    p.add_argument("--index", metavar="DIR", help=_INDEX_HELP)
    p.set_defaults(func=_cmd_undo)


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
    _add_search,
    _add_duplicates,
    _add_undo,
    _add_info,
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
