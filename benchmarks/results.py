"""Appends a measured section to benchmarks/RESULTS.md: name, UTC time, the exact command, body."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def append_section(script: str, body: str, argv: Sequence[str] | None = None) -> None:
    """Writes ``## SCRIPT, TIME`` then the command that ran (``python benchmarks/SCRIPT.py``
    with ``argv``, default the process's own arguments) and ``body``."""
    args = list(argv if argv is not None else sys.argv[1:])
    command = shlex.join(["python", f"benchmarks/{script}.py", *args])  # quoted: copy-pasteable
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nMeasured numbers only, newest last.\n")
        f.write(f"\n## {script}, {stamp}\n\n```\n{command}\n```\n\n{body.rstrip()}\n")
