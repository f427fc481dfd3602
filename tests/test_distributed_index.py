"""`mocoretrieval index` on several ranks: two gloo CPU processes under torchrun give the index
one process gives; a rank that dies loses only its batch in flight; shards left by another
world size are merged; the deal is balanced."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mocoretrieval import embed
from mocoretrieval.cli import main
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import DATABASE, UpdateLock
from mocoretrieval.sharded_embedding import embed_into
from mocoretrieval.shards import SHARDS_DIRNAME, deal, open_shard, shard_file
from mocoretrieval.store import FileStat

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--backend", "torch", "--workers", "0", "--batch-size", "4", "-q"]

# Run by the resume test on each rank: counts what is embedded and committed, and makes rank 1
# die (os._exit, as a killed process: no cleanup) when its second batch is embedded, i.e.
# after its first batch was committed, on torchrun's first attempt only.
DRIVER = """
import json, os, sys
from mocoretrieval import embed
from mocoretrieval.cli import main
from mocoretrieval.errors import MoCoRetrievalError

LOG, RANK = sys.argv[1], int(os.environ["RANK"])
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
real = embed.iter_embeddings

def log(event, batch):
    paths = batch.paths + [p for p, _ in batch.skipped]
    with open(LOG, "a") as f:
        f.write(json.dumps({"attempt": ATTEMPT, "rank": RANK, "event": event, "paths": paths}))
        f.write("\\n")

def counting(*args, **kwargs):
    batches = real(*args, **kwargs)
    def each():
        for i, batch in enumerate(batches):
            if ATTEMPT == 0 and RANK == 1 and i == 1:
                if os.environ.get("RANK1_FAILS"):  # an error, not a death: rank 0 is told
                    raise MoCoRetrievalError("disk on fire")
                os._exit(1)
            log("embedded", batch)
            yield batch
            log("committed", batch)  # the caller asked for more: this one is committed
    return each()

embed.iter_embeddings = counting
sys.exit(main(sys.argv[2:]))
"""


def _torchrun(
    tmp_path: Path, *args: str, restarts: int = 0, **env: str
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: tests and other jobs never share a rendezvous
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def _errors(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines, then the end of torchrun's report."""
    lines = [line for line in proc.stderr.splitlines() if "rror" in line]
    return "\n".join(lines[:20]) + "\n" + proc.stderr[-1500:]


def _vectors(index_dir: Path) -> dict[str, tuple[int, np.ndarray]]:
    """path -> (vector id, vector) of every embedded file of an index."""
    with ImageIndex.open(index_dir) as index:
        files = index.store.files()
        entries = index.store.entries(sorted(files))
    return {p: (files[p].vector_id, e.vector) for p, e in entries.items() if e.vector is not None}


def _assert_same_index(index_dir: Path, reference: Path, queries: list[Path]) -> None:
    got, want = _vectors(index_dir), _vectors(reference)
    assert sorted(got) == sorted(want)
    for p, (vector_id, vector) in want.items():
        assert got[p][0] == vector_id  # merged in the order one process embeds them
        np.testing.assert_allclose(got[p][1], vector, atol=1e-5)
    with ImageIndex.open(index_dir) as a, ImageIndex.open(reference) as b:
        for q in queries:
            assert [r.relpath for r in a.search(q, k=10)] == [r.relpath for r in b.search(q, k=10)]
    assert not (index_dir / SHARDS_DIRNAME).exists()


@pytest.fixture
def reference(image_folder, tiny_encoder_dir, tmp_path):
    """The single-process index of ``image_folder``."""
    out = tmp_path / "one-process"
    args = ["index", str(image_folder), "--index", str(out), "--model", str(tiny_encoder_dir)]
    assert main([*args, *FLAGS]) == 0
    return out


def test_deal_balances_counts_and_bytes_deterministically():
    """Mutations caught: dealing to the rank with the most bytes, or dealing by bytes alone
    (plain LPT: one big file against many small ones unbalances the counts)."""
    rng = np.random.default_rng(0)
    sizes = {f"f{i:03d}": int(s) for i, s in enumerate(rng.lognormal(13, 1.5, 203))}
    sizes["huge"] = 10 * sum(sizes.values()) // 203
    shares = deal(sizes, 4)
    assert sorted(p for share in shares for p in share) == sorted(sizes)
    counts = [len(share) for share in shares]
    assert max(counts) - min(counts) <= 1
    loads = [sum(sizes[p] for p in share) for share in shares]
    assert max(loads) - min(loads) <= sizes["huge"]
    assert max(loads) / min(loads) < 1.05
    assert deal(dict(reversed(sizes.items())), 4) == [
        sorted(s, key=list(reversed(sizes)).index) for s in shares
    ]  # the same files per rank whatever the order given; each share in the order given
    assert deal({}, 3) == [[], [], []]
    one_big = {"big": 1000, **{f"small{i:02d}": 10 for i in range(99)}}
    assert [len(share) for share in deal(one_big, 2)] == [50, 50]  # by bytes alone: 1 and 99


def test_two_ranks_index_like_one_process(image_folder, tiny_encoder_dir, tmp_path, reference):
    """2 gloo processes under torchrun: the same vectors (ids included), the same search
    results, 9 files per rank; while another writer holds the index's lock, nothing is written
    and every rank ends.

    Mutation caught: merging shard by shard instead of in the walk's order (the vectors get
    other ids than one process gives them). The busy run checks that a rank 0 refused the lock
    leaves no store and no shard behind, and that the other ranks end instead of waiting.
    """
    out = tmp_path / "two-ranks"
    args = ["-m", "mocoretrieval", "index", str(image_folder), "--index", str(out)]
    args += ["--model", str(tiny_encoder_dir), *FLAGS]
    out.mkdir()
    with UpdateLock(out):  # another `mocoretrieval index` at work
        busy = _torchrun(tmp_path, *args)
    assert busy.returncode != 0
    assert "another `mocoretrieval index`, `watch` or `undo` is writing" in busy.stderr
    assert not (out / SHARDS_DIRNAME).exists() and not (out / DATABASE).exists()

    proc = _torchrun(tmp_path, *args)
    assert proc.returncode == 0, _errors(proc)
    assert "2 ranks embedded 9, 9 files" in proc.stdout
    assert "added 18" in proc.stdout
    _assert_same_index(out, reference, sorted(image_folder.rglob("*.jpg"))[:4])


def test_two_ranks_index_a_library_of_two_roots_like_one_process(
    image_folder, tiny_encoder_dir, tmp_path
):
    """A library of two roots (keys ``NAME/...``): each rank finds every key's file under its
    own root, and the index equals one process's.

    Mutation caught: a plan carrying the first root only (as before several roots): the
    second root's keys are of no root the rank knows, and the run fails (checked)."""
    from factories import make_images

    nas = tmp_path / "nas"
    make_images(nas, 6, seed=2)
    roots = [str(image_folder), str(nas)]
    one = tmp_path / "one-process"
    assert (
        main(["index", *roots, "--index", str(one), "--model", str(tiny_encoder_dir), *FLAGS]) == 0
    )
    out = tmp_path / "two-ranks"
    args = ["-m", "mocoretrieval", "index", *roots, "--index", str(out)]
    proc = _torchrun(tmp_path, *args, "--model", str(tiny_encoder_dir), *FLAGS)
    assert proc.returncode == 0, _errors(proc)
    assert "added 24" in proc.stdout and "skipped 0" in proc.stdout
    _assert_same_index(out, one, [nas / "img_0000.jpg", image_folder / "img_0001.png"])


def test_a_rank_that_dies_loses_only_its_batch_in_flight(
    image_folder, tiny_encoder_dir, tmp_path, reference
):
    """Rank 1 dies after committing its first batch; torchrun's elastic restart runs both
    ranks again, which embed only what no shard holds, and the index is the one-process one.

    Mutation caught: ignoring the shards of the earlier attempt (survey returning nothing):
    the files committed before the crash are embedded again.
    """
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    log = tmp_path / "embedded.jsonl"
    out = tmp_path / "two-ranks"
    args = [str(driver), str(log), "index", str(image_folder), "--index", str(out)]
    proc = _torchrun(tmp_path, *args, "--model", str(tiny_encoder_dir), *FLAGS, restarts=1)
    assert proc.returncode == 0, _errors(proc)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    committed = {p for e in events if (e["attempt"], e["event"]) == (0, "committed")
                 for p in e["paths"]}  # fmt: skip
    rank1 = {p for e in events if (e["attempt"], e["rank"], e["event"]) == (0, 1, "committed")
             for p in e["paths"]}  # fmt: skip
    again = {p for e in events if (e["attempt"], e["event"]) == (1, "embedded") for p in e["paths"]}
    assert len(rank1) == 4  # its first batch, then it died
    assert again and not again & committed  # what was committed is not embedded again
    assert committed | again == {p for e in events for p in e["paths"]}
    reused = re.search(r"\((\d+) found done in the shards", proc.stdout)
    assert reused and int(reused.group(1)) >= len(committed)
    _assert_same_index(out, reference, sorted(image_folder.rglob("*.png"))[:4])


def test_a_rank_that_fails_is_reported_by_rank_0(image_folder, tiny_encoder_dir, tmp_path):
    """Rank 1 raises after its first batch: rank 0 says which rank failed and why, every rank
    ends, and the batches done stay in the shards for the next run.

    Mutation caught: a failing rank that does not report to rank 0 (no gather before it
    raises): rank 0 waits for it, and torchrun ends the run without rank 0's message.
    """
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "two-ranks"
    args = [str(driver), str(tmp_path / "log"), "index", str(image_folder), "--index", str(out)]
    proc = _torchrun(tmp_path, *args, "--model", str(tiny_encoder_dir), *FLAGS, RANK1_FAILS="1")
    assert proc.returncode != 0
    assert "rank 1: disk on fire. The batches done are kept in" in proc.stderr
    assert (out / SHARDS_DIRNAME / "rank-00001-of-00002.db").is_file()


def test_one_process_merges_shards_of_another_world_size(
    image_folder, tiny_encoder, tiny_encoder_dir, tmp_path, reference, monkeypatch
):
    """A plain `mocoretrieval index` (no torchrun) after an interrupted 4-rank run: what rank 3
    committed is merged, not embedded again; a shard of another model is deleted unmerged.

    Mutations caught: the leftover shards not looked for outside torchrun (every file embedded
    here), a shard of another model merged (its files' vectors would differ).
    """
    out = tmp_path / "resumed"
    args = ["index", str(image_folder), "--index", str(out), "--model", str(tiny_encoder_dir)]
    assert main([*args, *FLAGS, "--exclude", "*"]) == 0  # the index exists, empty
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("img_*"))
    stats = [(p, *FileStat(st.st_size, st.st_mtime_ns)) for p in files
             for st in [(image_folder / p).stat()]]  # fmt: skip
    pin = tiny_encoder.weights_hash()
    shard = open_shard(shard_file(out, 3, 4), tiny_encoder.dim, "float32", pin)
    embed_into(shard, tiny_encoder, image_folder, stats[:5], batch_size=4, workers=0, device="cpu")
    shard.close()
    other = open_shard(shard_file(out, 0, 4), tiny_encoder.dim, "float32", "another model")
    other.add_batch([files[7]], np.ones((1, tiny_encoder.dim), np.float32) / 8,
                    [FileStat(*stats[7][1:])])  # fmt: skip
    other.close()
    embedded: list[str] = []
    real = embed.iter_embeddings
    monkeypatch.setattr(
        embed,
        "iter_embeddings",
        lambda enc, root, paths, **kw: (embedded.extend(paths), real(enc, root, paths, **kw))[1],
    )
    assert main([*args, *FLAGS, "--no-exclude"]) == 0
    assert sorted(embedded) == files[5:]
    _assert_same_index(out, reference, [image_folder / files[0]])


def test_a_torch_model_on_a_gpu_rank_embeds_under_bf16_autocast(monkeypatch):
    """A rank's torch model on a GPU runs under bf16 autocast, on a CPU (or through ONNX) in
    float32; each rank takes the GPU of its local index, wrapping around the GPUs it sees.
    Checked without a GPU: the context a rank would enter, and the device it would pick (the
    GPU count patched). Catches the GPU branch deleted (mutation run: ``_bf16`` returning
    ``nullcontext()`` always: fails)."""
    import contextlib
    import warnings

    import torch

    from mocoretrieval.ranks import Ranks
    from mocoretrieval.sharded_embedding import _bf16, rank_device

    model = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast"
        gpu = _bf16(model, torch.device("cuda", 1))
    assert isinstance(gpu, torch.autocast)
    assert gpu.device == "cuda" and gpu.fast_dtype == torch.bfloat16
    assert isinstance(_bf16(model, torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(_bf16(object(), torch.device("cuda", 0)), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(None, Ranks(rank=3, world_size=4, local_rank=3)) == "cuda:1"
    assert rank_device("cpu", Ranks(rank=3, world_size=4, local_rank=3)) == "cpu"
