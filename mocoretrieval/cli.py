"""The `mocoretrieval` command: wiring over the library, nothing more.

Each subcommand is a small `_cmd_*` function; `main` parses, dispatches, and turns a
`MoCoRetrievalError` into one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from .errors import MoCoRetrievalError


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


# Subcommand registrars, in the order `--help` lists them. Features add theirs here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert]


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
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except MoCoRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; work committed so far is kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
