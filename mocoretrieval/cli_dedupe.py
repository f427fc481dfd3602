"""The `duplicates` and `undo` subcommands: list duplicate groups, clean them up journaled, and
put every file back. Wiring over `ImageIndex.duplicates` and :mod:`mocoretrieval.dedupe`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from .cli_common import INDEX_HELP as _INDEX_HELP
from .cli_common import Progress
from .cli_common import shown as _shown
from .errors import MoCoRetrievalError

if TYPE_CHECKING:
    from .dedupe import ApplyReport, Proposal
    from .index import DuplicateGroup, ImageIndex


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
    # --keep PATTERN matches keys: relative to the root, NAME/... in a library of several.
    proposals = dedupe.suggest(groups, args.keep, args.reference or (), index.relative)
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


def add_duplicates(sub: argparse._SubParsersAction) -> None:
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


def add_undo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "undo",
        help="put back the files of the last `duplicates --move-to/--trash`",
        description="Replays the latest clean-up journal backwards: every moved or trashed file "
        "returns to its original path, never over another file.",
    )
    p.add_argument("--index", metavar="DIR", help=_INDEX_HELP)
    p.set_defaults(func=_cmd_undo)
