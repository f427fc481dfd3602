"""Decoding image files in worker processes, where a bad file costs that file and nothing more.

The contract of :func:`decode_batches` (pinned by ``tests/test_decode_pool.py``):

- It yields, in input order, one list of :class:`DecodedBatch` per model batch; every file of
  the batch is in one of them, decoded or in ``failed`` with its reason.
- A file whose decoding raises is failed with the reason (``"not an image"``, ``"truncated"``...).
- A file whose decoder ends its worker (a segfault in a C library, ``os._exit``, the OOM
  killer) is failed with ``"crashed the decoder (SIGSEGV)"`` (the signal, or the exit code);
  the other files of its chunk are decoded again, each alone, and delivered.
- A file whose decoding takes over ``timeout`` seconds is failed with ``"decoding took over
  60 s"``; its worker is killed and replaced.
- The parent never waits without a bound: it waits on the workers' pipes and process
  sentinels together (``connection.wait``), so a death is seen at once, a hang at its deadline.
- Workers stop when the iterator ends, is closed or collected, or raises (Ctrl-C); they ignore
  SIGINT, and on Linux die with the parent (``PR_SET_PDEATHSIG``), also when it is killed.
- ``workers=0`` decodes in this process, each file in a helper thread abandoned after
  ``timeout`` (see :func:`run_with_timeout`); a crash then ends the process, which is why
  workers are the default.

Why a pool of our own, on ``multiprocessing``, rather than torch's DataLoader: the DataLoader
either checks its workers' liveness every 5 s (``timeout=0``: a stuck decoder hangs the run)
or waits up to its ``timeout`` (then a dead worker is noticed only at that timeout: 60 s per
file; one crash took 454 s in tests/test_embed.py), and recovering at all meant keeping its
workers off torch's SIGCHLD handler through private attributes an upgrade can change silently.
Throughput is kept: each worker decodes ``prefetch_factor`` chunks ahead, as in the DataLoader,
and tensors cross the pipe through torch's shared-memory reductions, its transport too; CUDA
pinning is done on arrival, a ~1 ms copy beside a batch's decoding.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing  # registers the shared-memory tensor reductions for pipes

from .decode_items import DecodedBatch, ImageFileDataset, collate

logger = logging.getLogger(__name__)

# A file whose decoding takes longer is skipped as a stuck decoder. Draft-mode decoding of a
# large photo takes well under a second; a minute is patience, not a limit on real files.
DECODE_TIMEOUT_S = 60.0


def run_with_timeout(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """``(True, fn())``, run in a helper thread, or ``(False, None)`` when it takes longer than
    ``timeout`` seconds; an exception of ``fn`` is raised here.

    A thread cannot be killed: one that times out is abandoned, a daemon thread that ends when
    ``fn`` returns or when the process exits, keeping its memory (and a CPU, if it spins) till
    then. A ``fn`` that holds the GIL throughout (a C loop that never releases it) cannot be
    timed out at all; Pillow's decoders and file reads release it.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed over to the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="mocoretrieval-decode", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        logger.warning("abandoned a decoding thread stuck for over %g s", timeout)
        return False, None
    ok, value = outcome[0]
    if not ok:
        raise value
    return True, value


def die_with_parent() -> None:
    """Asks Linux to kill this process when its parent dies (``PR_SET_PDEATHSIG``): a worker
    stuck in a decoder would otherwise outlive a killed ``mocoretrieval index``. Elsewhere a
    no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _worker_main(conn: Connection, dataset: ImageFileDataset) -> None:
    """A worker's loop: ``(seq, indices)`` in, ``(seq, DecodedBatch)`` out, until None or EOF."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # as DataLoader workers: the cores are the workers' and the model's
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        seq, chunk = task
        try:
            out: Any = collate([dataset[i] for i in chunk])
        except Exception as e:  # noqa: BLE001 - e.g. a transform giving unequal shapes
            out = f"{type(e).__name__}: {e}"
        conn.send((seq, out))


def start_forked_safely(process: Any, start_method: str) -> None:
    """Starts ``process``; when it is forked, none of the parent's objects can be finalised in
    the child.

    A forked child inherits the parent's unreachable objects still waiting for the cycle
    collector; if the child's collector finalises them, their destructors run without the
    threads they expect: an onnxruntime session's waits forever for its thread pool (seen in
    the test suite: decoders hung in ``pthread_cond_destroy``). Every object is frozen for the
    fork (the child's collector never looks at frozen objects; O(1), unlike a collection) and
    unfrozen in the parent at once, whose collector finalises its garbage where it belongs.
    """
    if start_method != "fork":
        process.start()
        return
    gc.freeze()
    try:
        process.start()
    finally:
        gc.unfreeze()


def _crash_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"crashed the decoder ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    if exitcode:
        return f"crashed the decoder (exit code {exitcode})"
    return "crashed the decoder"


@dataclass
class _Worker:
    process: Any  # a multiprocessing Process
    conn: Connection
    queue: deque[list[int]] = field(default_factory=deque)  # chunks sent, in decoding order
    seqs: deque[int] = field(default_factory=deque)  # their sequence numbers
    since: float = 0.0  # when it started on the chunk at the head of ``queue``


class _Pool:
    """Worker processes decoding chunks of ``dataset``; see :func:`decode_batches`."""

    def __init__(self, dataset: ImageFileDataset, workers: int, timeout: float) -> None:
        self.dataset, self.timeout = dataset, timeout
        self.ctx = mp.get_context()
        self.workers = [self._start() for _ in range(workers)]

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_worker_main, args=(child, self.dataset), name="mocoretrieval-decode"
        )
        process.daemon = True
        start_forked_safely(process, self.ctx.get_start_method())
        child.close()
        return _Worker(process, parent)

    def send(self, w: _Worker, seq: int, chunk: list[int]) -> None:
        if not w.queue:
            w.since = time.monotonic()
        w.queue.append(chunk)
        w.seqs.append(seq)
        try:
            w.conn.send((seq, chunk))
        except OSError:  # it died: its sentinel says so in _outcome, and the chunk is retried
            pass

    def _deadline(self, w: _Worker) -> float:
        return w.since + self.timeout * max(1, len(w.queue[0]))

    def _wait(self, busy: list[_Worker]) -> list[Any]:
        timeout = min(self._deadline(w) for w in busy) - time.monotonic()
        return wait([w.conn for w in busy] + [w.process.sentinel for w in busy], max(0.0, timeout))

    def _outcome(self, w: _Worker, ready: list[Any]) -> DecodedBatch | str | None:
        """The head chunk's decoded batch, the reason its worker failed, or None: at work."""
        if w.conn in ready:
            try:
                _, out = w.conn.recv()
            except (EOFError, OSError):  # died without sending: seen as dead below
                pass
            else:
                if isinstance(out, str):
                    raise RuntimeError(f"a decoding worker failed: {out}")  # noqa: TRY004
                w.queue.popleft()
                w.seqs.popleft()
                w.since = time.monotonic()
                return out
        if w.process.sentinel in ready or not w.process.is_alive():
            w.process.join()
            return _crash_reason(w.process.exitcode)
        if time.monotonic() >= self._deadline(w):
            return f"decoding took over {self.timeout:g} s"
        return None

    def receive(self, results: dict[int, list[DecodedBatch]]) -> None:
        """Waits for the next event of the busy workers: results, deaths or a deadline."""
        busy = [w for w in self.workers if w.queue]
        ready = self._wait(busy)
        for w in busy:
            seq = w.seqs[0]
            out = self._outcome(w, ready)
            if isinstance(out, DecodedBatch):
                results[seq] = [out]
            elif out is not None:
                results[seq] = self._replace(w, out)

    def _replace(self, w: _Worker, reason: str) -> list[DecodedBatch]:
        """Replaces a failed worker; the chunk it was on is decoded again file by file, so that
        only the culprit fails (with the reason it fails with alone)."""
        logger.warning("a decoding worker failed (%s); retrying its files one by one", reason)
        chunk = w.queue.popleft()
        w.seqs.popleft()
        self._stop(w)
        new = self._start()
        self.workers[self.workers.index(w)] = new
        for seq, rest in zip(w.seqs, w.queue):
            self.send(new, seq, rest)
        return [self._decode_alone(i) for i in chunk]

    def _decode_alone(self, i: int) -> DecodedBatch:
        """Decodes item ``i`` in a worker of its own; a crash or a hang marks that file only."""
        w = self._start()
        try:
            self.send(w, -1, [i])
            while (out := self._outcome(w, self._wait([w]))) is None:
                pass
            return out if isinstance(out, DecodedBatch) else DecodedBatch([], None, [(i, out)], [])
        finally:
            self._stop(w)

    def _stop(self, w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.conn.close()
        w.process.join()

    def close(self) -> None:
        """Stops every worker: idle ones finish, busy ones (work no one wants now) are killed."""
        for w in self.workers:
            if not w.queue:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
        for w in self.workers:
            if not w.queue:
                w.process.join(1.0)
            self._stop(w)
        self.workers = []


def decode_batches(
    dataset: ImageFileDataset,
    chunks: list[list[int]],
    chunks_per_batch: list[int],
    *,
    workers: int,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    timeout: float | None = None,
) -> Generator[list[DecodedBatch], None, None]:
    """Decodes ``dataset`` chunk by chunk in ``workers`` processes; see the module's contract.

    Args:
        dataset: the files to decode.
        chunks: lists of dataset indices, in order (see :func:`mocoretrieval.embed.plan_chunks`).
        chunks_per_batch: how many consecutive chunks make each yielded batch.
        workers: decoding processes; 0 decodes in this process.
        prefetch_factor: chunks each worker decodes ahead.
        pin_memory: pin the images in page-locked memory (for a fast copy to CUDA).
        timeout: seconds a file may take; None is :data:`DECODE_TIMEOUT_S`.

    Returns:
        An iterator of one list of :class:`DecodedBatch` per entry of ``chunks_per_batch``.
    """
    timeout = DECODE_TIMEOUT_S if timeout is None else timeout
    if workers == 0:
        return _decode_here(dataset, chunks, chunks_per_batch, timeout)
    return _decode_in_workers(
        dataset, chunks, chunks_per_batch, workers, max(1, prefetch_factor), pin_memory, timeout
    )


def _decode_here(
    dataset: ImageFileDataset,
    chunks: list[list[int]],
    chunks_per_batch: list[int],
    timeout: float,
) -> Generator[list[DecodedBatch], None, None]:
    def item(i: int) -> tuple[int, Any, str | None, bytes | None]:
        done, out = run_with_timeout(lambda: dataset[i], timeout)
        return out if done else (i, None, f"decoding took over {timeout:g} s", None)

    start = 0
    for n in chunks_per_batch:
        yield [collate([item(i) for i in chunk]) for chunk in chunks[start : start + n]]
        start += n


def _decode_in_workers(
    dataset: ImageFileDataset,
    chunks: list[list[int]],
    chunks_per_batch: list[int],
    workers: int,
    prefetch: int,
    pin_memory: bool,
    timeout: float,
) -> Generator[list[DecodedBatch], None, None]:
    pool = _Pool(dataset, min(workers, len(chunks)) or 1, timeout)
    results: dict[int, list[DecodedBatch]] = {}  # by chunk: one part, or one per file
    sent = 0
    try:
        start = 0
        for n in chunks_per_batch:
            parts = []
            for seq in range(start, start + n):
                while seq not in results:
                    while sent < len(chunks):  # keep every worker ``prefetch`` chunks ahead
                        w = min(pool.workers, key=lambda w: len(w.queue))
                        if len(w.queue) >= prefetch:
                            break
                        pool.send(w, sent, chunks[sent])
                        sent += 1
                    pool.receive(results)
                for part in results.pop(seq):
                    if pin_memory and part.images is not None:
                        part = part._replace(images=part.images.pin_memory())
                    parts.append(part)
            start += n
            yield parts
    finally:
        pool.close()
