"""The processes of the concurrency stress test: one writer running `mocoretrieval index`
round after round, and readers that keep one index open and search it, as `serve` does; and
the guard that never leaves them behind.

Every role dies with the process that started it (``PR_SET_PDEATHSIG`` on Linux, and a check
of its parent between rounds elsewhere), and :func:`running` stops them on every way out of the
test: so a failed, timed-out, interrupted or killed run leaves no process searching on.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

GRACE_S = 30.0  # after the stop file: a reader finishes its round (a search, maybe a rebuild)
TERM_S = 10.0  # after SIGTERM, before SIGKILL


def _orphaned() -> bool:
    """Whether the process that started this one has ended (a sentinel, not ``getppid() == 1``:
    an orphan may be adopted by a subreaper other than init)."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _guard() -> None:
    """Asks Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``, as
    :func:`mocoretrieval.decode_pool.die_with_parent`, without importing torch); elsewhere the roles
    check their parent between rounds."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if _orphaned():  # the parent died before the request took effect
        os._exit(1)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def running(processes: Sequence[BaseProcess], stop: Path, grace: float = GRACE_S) -> Iterator[None]:
    """Starts ``processes``; on the way out, whatever it is (the end of the test, a failed
    assertion, an exception, Ctrl-C, or SIGTERM as from ``timeout``, turned into a
    KeyboardInterrupt meanwhile), creates ``stop``, waits up to ``grace`` seconds for them, then
    terminates, then kills and joins every one still running."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for p in processes:
            p.start()
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut this short
        try:
            stop.touch()
            deadline = time.monotonic() + grace
            for p in processes:
                if p.pid is not None:
                    p.join(max(0.0, deadline - time.monotonic()))
            alive = [p for p in processes if p.pid is not None and p.is_alive()]
            for p in alive:
                p.terminate()
            for p in alive:
                p.join(TERM_S)
                if p.is_alive():
                    p.kill()
                    p.join(TERM_S)
        finally:
            signal.signal(signal.SIGTERM, previous)


def writer(root: str, models: list[str], rounds: int, seed: int, out: str) -> None:
    """Each round adds and deletes a file, then re-indexes: every other round with
    ``--rebuild`` and the other model, else a plain update. Writes the exit codes to ``out``."""
    _guard()
    from factories import make_images

    from mocoretrieval.cli import main

    rng = random.Random(seed)
    codes = []
    for r in range(rounds):
        if _orphaned():
            return
        make_images(Path(root) / f"round{r}", 1, seed=100 + r)
        present = sorted(p for p in Path(root).rglob("img_*") if ".mocoretrieval" not in p.parts)
        if len(present) > 4:
            rng.choice(present).unlink()
        args = ["index", root, "--backend", "torch", "--device", "cpu", "--workers", "0", "-q"]
        if r % 2 == 0:
            args += ["--rebuild", "--model", models[(r // 2 + 1) % 2]]
        codes.append(main(args))
    Path(out).write_text(json.dumps({"codes": codes, "last_model": _last(models, rounds)}))


def _last(models: list[str], rounds: int) -> str:
    last_rebuild = max(r for r in range(rounds) if r % 2 == 0)
    return models[(last_rebuild // 2 + 1) % 2]


def reader(root: str, query: str, stop: str, out: str, seed: int) -> None:
    """Searches one long-lived index until ``stop`` exists, then once more; writes how many
    rounds it made and every error it met to ``out``. Stops at once if its parent died."""
    _guard()
    import numpy as np

    from mocoretrieval.index import ImageIndex

    rng = np.random.default_rng(seed)
    errors: list[str] = []
    rounds = 0
    index = ImageIndex.open(root)
    last = False
    while not _orphaned():
        last = os.path.exists(stop)
        try:
            index.search(query, k=3)
            index.search(rng.standard_normal(index.dim).astype(np.float32), k=3)
            len(index)
            index.info()
        except Exception as e:  # noqa: BLE001 - every error is a failure the test reports
            errors.append(f"{type(e).__name__}: {e}")
        rounds += 1
        if last:
            break
        time.sleep(0.05)
    index.close()
    Path(out).write_text(json.dumps({"rounds": rounds, "errors": errors}))


def stuck(pid_file: str) -> None:
    """A child that ignores the stop file and SIGTERM: only SIGKILL ends it (for the guard's
    own tests)."""
    _guard()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
