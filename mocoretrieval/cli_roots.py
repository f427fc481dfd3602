"""`mocoretrieval roots list|add|remove|move`: the folders of a library, wiring over
:class:`~mocoretrieval.library.LibraryRoots`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .cli_common import INDEX_HELP


def known_roots(index: str | None) -> list[Path]:
    """The roots of the index at ``index`` (or found here and above), for ``index`` without ROOT."""
    from .index import ImageIndex

    with ImageIndex.open(index) as opened:
        return [r.path for r in opened.roots]


def print_roots(roots: list[dict[str, Any]]) -> None:
    """One line per root of :meth:`ImageIndex.roots_info`: name, folder, state, images."""
    width = max((len(r["name"]) for r in roots), default=0)
    for r in roots:
        n = r["files"]
        files = f"{n} file" + ("" if n == 1 else "s")
        state = "online" if r["state"] == "online" else f"OFFLINE: {r['offline_reason']}, kept"
        print(f"  {r['name']:<{width}}  {r['path']}  ({state}; {files})")


def _open(args: argparse.Namespace) -> Any:
    from .index import ImageIndex

    return ImageIndex.open(args.index)


def _cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as index:
        roots = index.roots_info()
    if args.json:
        print(json.dumps(roots, indent=2))
    else:
        print_roots(roots)
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    with _open(args) as index:
        root = index.add_root(args.folder, name=args.name)
        print(
            f"added {root.path} as {root.name!r}: run `mocoretrieval index --index {index.path}` "
            "to embed its images"
        )
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    with _open(args) as index:
        root = index.roots.find(args.root)
        n = index.remove_root(args.root)
        print(f"removed the root {root.path}: forgot {n} indexed files (the files are untouched)")
    return 0


def _cmd_move(args: argparse.Namespace) -> int:
    with _open(args) as index:
        old = index.roots.find(args.root).path
        root = index.move_root(args.root, args.new)
        print(
            f"moved the root {root.name!r} from {old} to {root.path}; nothing is re-embedded: "
            f"run `mocoretrieval index --index {index.path}` to check it"
        )
    return 0


def add_roots(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "roots",
        help="list, add, remove or move the folders of a library",
        description="An index can cover several folders (roots). Each file is stored relative "
        "to its root, so a root can move (a new mount point, a renamed drive) without "
        "re-embedding anything.",
    )
    actions = p.add_subparsers(dest="action", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--index", metavar="DIR", help=INDEX_HELP)

    q = actions.add_parser("list", help="each root: name, folder, online or offline, files")
    common(q)
    q.add_argument("--json", action="store_true", help="print a JSON list")
    q.set_defaults(func=_cmd_list)

    q = actions.add_parser("add", help="add a folder (embedded by the next `mocoretrieval index`)")
    q.add_argument("folder", help="the folder to add; it must not overlap another root")
    q.add_argument("--name", help="its name in the library (default: the folder's name)")
    common(q)
    q.set_defaults(func=_cmd_add)

    q = actions.add_parser(
        "remove", help="forget a root and its indexed images (the files are not touched)"
    )
    q.add_argument("root", help="the root's name or folder")
    common(q)
    q.set_defaults(func=_cmd_remove)

    q = actions.add_parser("move", help="say that a root's folder moved (nothing is re-embedded)")
    q.add_argument("root", help="the root's name or old folder")
    q.add_argument("new", help="its new folder")
    common(q)
    q.set_defaults(func=_cmd_move)
