"""Moving a file without ever replacing another, and finding a file in the trash again.

Used by :mod:`mocoretrieval.dedupe` both ways: a clean-up moves files away, `undo` brings them
back; neither may overwrite anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from urllib.parse import unquote

TRASH_HELP = (
    "look in your desktop's trash (Linux: ~/.local/share/Trash/files, or .Trash-UID at the "
    "top of the drive; macOS: ~/.Trash; Windows: the Recycle Bin) and restore it from there"
)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def move_file(src: Path, dst: Path) -> None:
    """Moves ``src`` to ``dst`` without ever replacing a file at ``dst``.

    On one filesystem a hard link then an unlink (``link`` fails if ``dst`` exists, where
    ``rename`` would replace it); across filesystems a copy into a file created exclusively,
    synced, then the unlink. A crash leaves ``src`` in place, maybe with a copy at ``dst``.

    Raises:
        FileExistsError: something is at ``dst``.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            shutil.copystat(src, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
    fsync_dir(dst.parent)
    os.unlink(src)
    fsync_dir(src.parent)


def send_to_trash(path: Path) -> None:
    """The desktop's trash, through ``send2trash``."""
    from send2trash import send2trash

    send2trash(str(path))


def _trash_dirs(path: Path) -> list[tuple[Path, Path]]:
    """Freedesktop trash folders that may hold ``path`` once trashed: ``(trash, topdir)``,
    where a ``.trashinfo`` Path is relative to ``topdir`` when the file was under it."""
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    found = [(data / "Trash", data)]
    mount = path.parent
    with contextlib.suppress(OSError):
        dev = os.stat(mount).st_dev
        while mount.parent != mount and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
    uid = str(os.getuid()) if hasattr(os, "getuid") else ""
    found += [(mount / ".Trash" / uid, mount), (mount / f".Trash-{uid}", mount)]
    return found


def locate_trashed(path: Path) -> tuple[Path, Path] | None:
    """Where a freedesktop trash put ``path`` (absolute): ``(file, its .trashinfo)``, the
    latest if it was trashed more than once; None when not found (another desktop's trash)."""
    best: tuple[float, Path, Path] | None = None
    stem = path.stem
    for trash, topdir in _trash_dirs(path):
        info_dir = trash / "info"
        try:
            entries = [e for e in os.scandir(info_dir) if e.name.startswith(stem)]
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(".trashinfo"):
                continue
            try:
                text = Path(entry.path).read_text(encoding="utf-8", errors="surrogateescape")
            except OSError:
                continue
            line = next((x for x in text.splitlines() if x.startswith("Path=")), None)
            if line is None:
                continue
            original = Path(unquote(line[5:]))
            if not original.is_absolute():
                original = topdir / original
            file = trash / "files" / entry.name[: -len(".trashinfo")]
            if os.path.abspath(original) == str(path) and os.path.lexists(file):
                when = entry.stat().st_mtime
                if best is None or when > best[0]:
                    best = (when, file, Path(entry.path))
    return None if best is None else (best[1], best[2])
