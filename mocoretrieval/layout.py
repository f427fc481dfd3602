"""The on-disk layout of an index directory: file names, the versioned manifest, the lock.

An index directory (by default ``ROOT/.mocoretrieval/``) holds:

- ``manifest.json``: format version, the first root, the encoder (source, weights hash, config, dim),
  metric, requested index type, the state of ``index.faiss`` (factory, search parameters,
  the store generation it was built from, its size), the ``--exclude`` patterns and what the
  ignore rules left out at the last update. Replaced atomically.
- ``index.db``: the SQLite :class:`~mocoretrieval.store.Store` — files and their embeddings,
  committed batch by batch — and the library's roots (:mod:`mocoretrieval.roots_table`). It is
  the source of truth.
- ``index.faiss``: derived from the stored embeddings; rebuilt (never by the model) when it is
  missing, corrupt or older than the database. Replaced atomically.
- ``lock``: held while an update (or an `undo`) runs.
- ``watch.lock``: held while a `mocoretrieval watch` runs (:mod:`mocoretrieval.watch`).
- ``journals/``: one JSON-lines journal per duplicate clean-up (:mod:`mocoretrieval.dedupe`),
  read by ``mocoretrieval undo``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IndexBusyError, IndexFormatError

if TYPE_CHECKING:
    from typing_extensions import Self

# Bump when a change would make an older mocoretrieval misread the index; older versions
# then refuse it with a message instead of returning wrong results.
# 2: the roots table (several roots, files keyed by root name); a version-1 index is migrated
# by its first writer (see mocoretrieval.roots_table), and read as it is until then.
FORMAT_VERSION = 2
DEFAULT_DIRNAME = ".mocoretrieval"
MANIFEST, DATABASE, FAISS_FILE, LOCK_FILE = "manifest.json", "index.db", "index.faiss", "lock"


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def replace_atomic(path: Path, write: Callable[[str], None], mode: int = 0o644) -> None:
    """Has ``write(tmp)`` fill a unique temporary file next to ``path``, syncs it, renames it
    over ``path`` and syncs the folder.

    The temporary name is unique (``mkstemp`` in the same folder): two writers never write into
    one file, and a crash leaves at worst a stray ``.name.*.tmp``, never a torn ``path``.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Writes JSON to ``path`` atomically (see :func:`replace_atomic`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    replace_atomic(path, write)


def find_index_dir(path: str | Path | None = None) -> Path:
    """The index directory at ``path``: the directory itself, or ``path/.mocoretrieval``.

    With ``path`` None, looks in the current directory and its parents, like git does, and
    stops where git stops: at a filesystem boundary (a mount point), so that a search under
    ``/mnt/photos`` never picks an index up from ``/``. An index found that way but owned by
    another user (e.g. a planted ``/tmp/.mocoretrieval``) is refused; pass it explicitly to
    trust it.

    Raises:
        IndexFormatError: no index there, or one found that another user owns.
    """
    if path is not None:
        path = Path(path).expanduser()
        for candidate in (path, path / DEFAULT_DIRNAME):
            if (candidate / MANIFEST).is_file():
                return candidate.resolve()
        raise IndexFormatError(
            f"no index at {path}: build one with `mocoretrieval index ROOT` "
            "(and pass its folder with --index)"
        )
    here = Path.cwd().resolve()
    device = here.stat().st_dev
    for folder in (here, *here.parents):
        try:
            if folder.stat().st_dev != device:
                break  # a filesystem boundary: discovery stops, as git's does
        except OSError:
            break
        candidate = folder / DEFAULT_DIRNAME
        if (candidate / MANIFEST).is_file():
            owner = candidate.stat().st_uid
            if hasattr(os, "getuid") and owner != os.getuid():
                raise IndexFormatError(
                    f"found an index at {candidate}, but it belongs to another user (uid "
                    f"{owner}); refusing it: pass --index {candidate} to use it anyway"
                )
            return candidate
    raise IndexFormatError(
        f"no index found in {here} or its parents: build one with `mocoretrieval index ROOT` "
        "or pass --index DIR"
    )


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """Reads the manifest; refuses one of a newer format with a message that says to upgrade."""
    try:
        manifest = json.loads((index_dir / MANIFEST).read_text())
        version = int(manifest["format_version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexFormatError(
            f"{index_dir / MANIFEST} is unreadable ({e}); delete {index_dir} and index again"
        ) from e
    if version > FORMAT_VERSION:
        raise IndexFormatError(
            f"the index at {index_dir} has format version {version}; this mocoretrieval reads "
            f"up to {FORMAT_VERSION}: upgrade with `pip install -U mocoretrieval`"
        )
    return manifest


class UpdateLock:
    """An exclusive lock on the index directory while updating; released by the OS on a crash."""

    def __init__(self, index_dir: Path) -> None:
        self.file = index_dir / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> Self:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; SQLite still serialises the writes
            return self
        try:
            self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IndexFormatError(
                f"cannot lock {self.file} ({e.strerror or e}): updating an index needs write "
                f"access to {self.file.parent}; `search`, `duplicates` and `info` work read-only"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise IndexBusyError(
                f"another `mocoretrieval index`, `watch` or `undo` is writing to "
                f"{self.file.parent}; wait for it to end and run this again"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
