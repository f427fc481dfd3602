"""The decoding pool's contract: in order; a crash, a hang or an error of one file costs only
that file, with its reason; the parent never hangs; no worker outlives the iterator.

Faults are injected by replacing ``data.load_image`` in this process: the workers are forked
from it (Linux's default start method) and inherit the replacement.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_images

from mocoretrieval import data
from mocoretrieval.decode_items import ImageFileDataset
from mocoretrieval.decode_pool import decode_batches
from mocoretrieval.embed import plan_chunks
from mocoretrieval.walk import walk_images

pytestmark = pytest.mark.skipif(
    mp.get_start_method() != "fork", reason="faults are injected into forked workers"
)

N = 10


def _pixels(img):  # a fixed-size uint8 crop, as Preprocess.pixels gives
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).contiguous()


@pytest.fixture
def files(tmp_path) -> tuple[Path, list[str]]:
    make_images(tmp_path, N)
    return tmp_path, walk_images(tmp_path)


def _decode(files, workers: int = 2, timeout: float | None = None, batch: int = 4):
    root, rel = files
    chunks, per_batch = plan_chunks(len(rel), batch, max(workers, 1))
    dataset = ImageFileDataset(root, rel, _pixels, min_side=8)
    batches = list(decode_batches(dataset, chunks, per_batch, workers=workers, timeout=timeout))
    assert len(batches) == len(per_batch)  # one per model batch, whatever failed
    done = [i for parts in batches for p in parts for i in p.indices]
    failed = [(rel[i], r) for parts in batches for p in parts for i, r in p.failed]
    images = [p.images for parts in batches for p in parts if p.images is not None]
    return [rel[i] for i in done], failed, torch.cat(images) if images else None


def _fault(monkeypatch, culprit: str, fault) -> None:
    real = data.load_image

    def load_image(path, *args, **kwargs):
        if os.path.basename(path) == culprit:
            fault()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_image", load_image)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_file_is_delivered_in_order(files, workers):
    """Fails when chunks are delivered as they finish rather than in order, or lost."""
    done, failed, images = _decode(files, workers=workers)
    assert done == files[1] and failed == []
    _, _, alone = _decode(files, workers=0)
    torch.testing.assert_close(images, alone)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (lambda: os.kill(os.getpid(), signal.SIGSEGV), "crashed the decoder (SIGSEGV)"),
        (lambda: os._exit(3), "crashed the decoder (exit code 3)"),
    ],
)
def test_a_crash_skips_that_file_and_delivers_the_rest(files, monkeypatch, fault, reason):
    """Broken once on purpose: with the crashed chunk failed whole (its files not decoded
    again alone), ``failed`` listed the culprit's chunk-mates too. With torch's DataLoader and its 60 s
    timeout, this took minutes: a dead worker was noticed only at the timeout."""
    culprit = files[1][5]
    _fault(monkeypatch, culprit, fault)
    t0 = time.monotonic()
    done, failed, _ = _decode(files, timeout=30)
    assert time.monotonic() - t0 < 10  # seen at once, not at the 30 s timeout
    assert failed == [(culprit, reason)]
    assert done == [p for p in files[1] if p != culprit]


def test_a_hang_is_skipped_after_the_timeout(files, monkeypatch):
    """Broken once on purpose: without the deadline check, the run waited out the stuck
    decoder (20 s), failing the time assertion, and then delivered the file."""
    culprit = files[1][2]
    _fault(monkeypatch, culprit, lambda: time.sleep(20))
    t0 = time.monotonic()
    done, failed, _ = _decode(files, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert failed == [(culprit, "decoding took over 0.5 s")]
    assert done == [p for p in files[1] if p != culprit]


def _boom():
    raise ValueError("bad huffman table")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_is_skipped_with_its_reason(files, monkeypatch, workers):
    """Broken once on purpose: without the dataset's catch-all, the iterator raised: the
    ValueError itself with no workers, RuntimeError("a decoding worker failed: ValueError:
    bad huffman table") with two."""
    culprit = files[1][3]
    _fault(monkeypatch, culprit, _boom)
    done, failed, _ = _decode(files, workers=workers)
    assert failed == [(culprit, "corrupt: bad huffman table")]
    assert done == [p for p in files[1] if p != culprit]


def test_without_workers_a_hang_is_skipped_after_the_timeout(files, monkeypatch):
    """Broken once on purpose: without run_with_timeout around the item, the run waited for
    the decoder (3 s), failing the time assertion, and the file was delivered."""
    culprit = files[1][0]
    _fault(monkeypatch, culprit, lambda: time.sleep(3))
    t0 = time.monotonic()
    done, failed, _ = _decode(files, workers=0, timeout=0.5)
    assert time.monotonic() - t0 < 2.5
    assert failed == [(culprit, "decoding took over 0.5 s")]
    assert done == files[1][1:]


def _workers_alive() -> list[mp.Process]:
    return [p for p in mp.active_children() if p.name == "mocoretrieval-decode"]


def test_closing_early_leaves_no_worker(files):
    """Broken once on purpose: without ``pool.close()`` in the generator's ``finally``, the
    two workers were still alive after ``close()``."""
    root, rel = files
    chunks, per_batch = plan_chunks(len(rel), 2, 2)
    batches = decode_batches(ImageFileDataset(root, rel, _pixels), chunks, per_batch, workers=2)
    next(batches)
    assert len(_workers_alive()) == 2
    batches.close()
    assert _workers_alive() == []


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_ctrl_c_while_a_worker_is_stuck_stops_the_workers(files, monkeypatch):
    """Ctrl-C in the parent, waiting on a decoder stuck for 20 s, ends the run at once and its
    workers with it. Broken once on purpose: without the ``finally``, workers were left."""
    culprit = files[1][0]
    _fault(monkeypatch, culprit, lambda: time.sleep(20))

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            _decode(files, timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < 5
    assert _workers_alive() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_ask_to_die_with_their_parent(files, monkeypatch):
    """The worker-side half of tests/reliability: every worker sets PR_SET_PDEATHSIG first.
    Broken once on purpose: without die_with_parent() in the worker's loop, every file
    "crashed the decoder (exit code 7)"."""
    real = data.load_image

    def load_image(path, *args, **kwargs):
        import ctypes

        sig = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # 2 = PR_GET_PDEATHSIG
        if sig.value != signal.SIGKILL:
            os._exit(7)  # shows up as a crash of every file
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_image", load_image)
    done, failed, _ = _decode(files)
    assert failed == [] and done == files[1]


class _Finalised:
    """Garbage in a reference cycle that records the process its finaliser runs in."""

    def __init__(self, record: Path) -> None:
        self.record, self.me = record, self

    def __del__(self) -> None:
        with open(self.record, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_a_forked_decoder_never_finalises_the_parents_garbage(files, tmp_path, monkeypatch):
    """onnxruntime's session destructor, run in a forked decoder, waited forever for a thread
    pool the child does not have (a hung full test suite). Breaking it: without the freeze
    around the fork, the cycle is finalised in the worker: checked, it fails."""
    import gc

    record = tmp_path / "finalised.txt"
    real = data.load_image

    def load_image(path, *args, **kwargs):
        gc.collect()  # what the child's collector may do at any allocation
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_image", load_image)
    gc.disable()  # the cycle must still be waiting for the collector when the pool forks
    try:
        _Finalised(record)
    finally:
        gc.enable()
    done, failed, _ = _decode(files, workers=2)
    assert len(done) == N and failed == []
    gc.collect()  # the parent's own collection finalises it, here
    assert record.read_text().split() == [str(os.getpid())]  # once, in this process
