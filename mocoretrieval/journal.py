"""The journal of a duplicate clean-up: JSON lines in the index folder, each appended and
fsynced before the file it describes is touched, so that `undo` can always put files back."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .safemove import fsync_dir

log = logging.getLogger(__name__)

JOURNALS = "journals"  # folder of the index directory


class Journal:
    """One clean-up's journal: JSON lines appended and fsynced one by one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, index_dir: Path) -> Journal:
        folder = index_dir / JOURNALS
        folder.mkdir(exist_ok=True)
        # Names sort in time order: `undo` takes the last.
        path = folder / f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.jsonl"
        path.touch(exist_ok=False)
        fsync_dir(folder)
        return cls(path)

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash: its file was not touched
                log.warning("%s: ignoring a torn line", self.path)
        return out


def journals(index_dir: Path) -> list[Path]:
    """The journals of an index, oldest first."""
    folder = index_dir / JOURNALS
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
