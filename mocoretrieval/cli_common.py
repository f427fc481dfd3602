"""Pieces every `mocoretrieval` subcommand module shares: progress bar, notices, options.

A module of their own so that `cli_eval` need not import `cli`, which imports `cli_eval` to add
the `eval` subcommand: the dependency goes one way.
"""

from __future__ import annotations

import argparse
import os
import sys


class Progress:
    """A tqdm bar with images/s on stderr, shown only on a terminal and without --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def notify(message: str) -> None:
    """Says why the command is about to wait (a one-time export), on stderr."""
    print(f"{message} ...", file=sys.stderr, flush=True)


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("torch", "onnx", "auto"),
        default="auto",
        help="inference backend: auto (default) runs onnxruntime on CPU, exporting the model "
        "once into ~/.cache/mocoretrieval/onnx, and torch on a GPU",
    )


def shown(path: str) -> str:
    """A result path as the table shows it: relative to the current folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


INDEX_HELP = "index directory or indexed folder (default: found here or in a parent folder)"
