"""How a run computes: precision, fp32 losses under autocast, no host syncs, threads, RNG state,
all_gather layouts, the kNN monitor's floors, presets and CLI defaults (issue 10)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from training import checkpoint as ckpt_io
from training import dist, runtime
from training.args import build_parser, config_from_args
from training.config import ConfigError, PretrainConfig, named_preset, preset
from training.export import encoder_from_checkpoint
from training.loaders import DataOptions
from training.losses import info_nce_batch, info_nce_queue
from training.moco import build_moco
from training.pretrain import RunOptions, train

FMNIST = DataOptions(limit_train=16, knn_bank=64, knn_val=32)


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice wins
    with pytest.raises(ConfigError, match="precision must be one of"):
        runtime.resolve_precision("fp16", cpu)


def test_losses_are_fp32_under_bf16_autocast():
    """Fails when the losses run under the caller's autocast (checked by removing the
    ``autocast(enabled=False)`` blocks: the bf16 einsum moves the loss by ~1e-2)."""
    torch.manual_seed(0)
    q = F.normalize(torch.randn(64, 128), dim=1)
    k = F.normalize(torch.randn(64, 128), dim=1)
    queue = F.normalize(torch.randn(128, 4096), dim=0)
    exact_queue = info_nce_queue(q, k, queue, 0.07)
    exact_batch = info_nce_batch(q, k, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_queue = info_nce_queue(q, k, queue, 0.07)
        under_batch = info_nce_batch(q, k, 0.2)
    assert under_queue.dtype == torch.float32 and under_batch.dtype == torch.float32
    assert torch.allclose(under_queue, exact_queue, rtol=0, atol=1e-6)
    assert torch.allclose(under_batch, exact_batch, rtol=0, atol=1e-6)


def test_a_moco_step_reads_nothing_back_to_the_host(monkeypatch):
    """A GPU step must not wait for the device: no ``int(tensor)`` / ``.item()`` in forward.
    Fails when enqueue reads the queue pointer with ``int(self.queue_ptr)`` (checked)."""
    cfg = preset(
        "v2", "resnet18", input_size=8, dim=8, queue_size=32, batch_size=8, shuffle_bn_groups=2
    )
    model = build_moco(cfg)
    x = torch.randn(8, 3, 8, 8)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the training step")

    monkeypatch.setattr(torch.Tensor, "__int__", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__index__", refuse)
    for _ in range(5):  # 40 keys: the pointer wraps around the queue of 32
        model(x, x, 0.99)
    monkeypatch.undo()
    assert int(model.queue_ptr) == 40 % 32


def test_cpu_threads_are_shared_among_local_processes(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert runtime.set_cpu_threads(torch.device("cpu")) == 2
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert runtime.set_cpu_threads(torch.device("cpu")) == 8
    finally:
        torch.set_num_threads(before)


def test_checkpoint_restores_only_this_devices_cuda_rng(monkeypatch):
    """A checkpoint saved on a machine with 4 GPUs (older format: every GPU's state) resumes on
    one that sees 1; a new checkpoint holds this device's state only."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)

    def no_all(*args):
        raise AssertionError("every GPU's RNG state was saved or restored")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_all)
    state = ckpt_io.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    ckpt_io.set_rng_state(state)
    old = dict(state, cuda=[torch.tensor([i], dtype=torch.uint8) for i in range(4)])
    ckpt_io.set_rng_state(old)
    assert [int(t[0]) for t in restored] == [7, 0]


def test_all_gather_hands_the_collective_contiguous_buffers(monkeypatch):
    """NCCL fills output buffers as if contiguous: ``torch.empty_like`` of a channels_last
    input keeps its strides and the gathered images come back scrambled. Fails with
    ``empty_like(x)`` outputs (checked); gloo copies internally, so the collective is faked."""
    seen = []

    def fake_all_gather(out, x):
        seen.extend(t.is_contiguous() for t in [*out, x])
        for r, t in enumerate(out):
            t.view(-1).copy_(x.reshape(-1) + 1000 * r)  # what a collective writes: flat memory

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist.dist, "all_gather", fake_all_gather)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    got = dist.all_gather(x.contiguous(memory_format=torch.channels_last))
    assert all(seen) and torch.equal(got, torch.cat([x, x + 1000]))


def test_knn_monitor_reports_random_init_and_pixels_then_every_n_epochs(tmp_path):
    cfg = preset(
        "v2",
        "resnet18",
        input_size=8,
        dim=8,
        queue_size=32,
        batch_size=8,
        epochs=3,
        shuffle_bn_groups=2,
    )
    cfg.knn_every = 2
    train(cfg, FMNIST, RunOptions(out_dir=str(tmp_path), device="cpu", export=False))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["precision"] in ("bf16", "fp32") and start["threads"] >= 1
    first = next(r for r in records if r["event"] == "knn")
    assert first["epoch"] == 0 and 0 <= first["knn_acc"] <= 1 and 0 <= first["pixels_knn_acc"] <= 1
    evaluated = [r["epoch"] for r in records if r["event"] == "epoch" and "knn_acc" in r]
    assert evaluated == [1, 2]  # epoch index 1 (2nd epoch, every 2) and the last one
    history = ckpt_io.load(tmp_path)["knn"]
    assert [h["epoch"] for h in history] == [0, 2, 3]
    # The model card carries the last epoch's accuracy, beside its floors, never the floor.
    extra = encoder_from_checkpoint(tmp_path).extra
    assert extra["knn_accuracy"] == history[-1]["knn_acc"]
    assert extra["knn_random_init"] == history[0]["knn_acc"]
    assert extra["knn_pixels"] == history[0]["pixels_knn_acc"]
    assert "after epoch 3" in extra["measured"]


def test_named_preset_and_cli_defaults():
    cfg = named_preset("fmnist-cpu")
    assert cfg.version == "v2" and cfg.arch == "resnet10" and not cfg.small_stem
    assert cfg.queue_size < 60000  # a queue larger than the data set repeats its images
    args = build_parser().parse_args(["--out-dir", "x", "--preset", "fmnist-cpu", "--T", "0.3"])
    cfg, explicit = config_from_args(args, fashion_mnist=True)
    assert cfg.T == 0.3 and cfg.queue_size == 4096 and explicit == ["T"]
    with pytest.raises(ConfigError, match="unknown preset"):
        named_preset("nope")
    for version in ("v1", "v3"):  # each version keeps its method, on the preset's budget
        args = build_parser().parse_args(["--out-dir", "x", "--preset", "fmnist-cpu"])
        args.version = version
        cfg, _ = config_from_args(args, fashion_mnist=True)
        assert cfg.version == version and cfg.arch == "resnet18" and cfg.batch_size == 256
    assert named_preset("fmnist-cpu", "v3").queue_size == 0
    assert named_preset("fmnist-cpu", "v1").proj_layers == 1
    photos = named_preset("photos-cpu")  # the shipped encoder's recipe: copy edits on
    assert (photos.arch, photos.input_size, photos.version) == ("resnet18", 112, "v2")
    assert photos.queue_size < 5550 and photos.jpeg_p > 0 and photos.rotate_deg > 0
    # Without --version the CLI trains the config's default version.
    args = build_parser().parse_args(["--out-dir", "x"])
    cfg, _ = config_from_args(args, fashion_mnist=True)
    assert cfg.version == PretrainConfig.__dataclass_fields__["version"].default
    assert cfg.input_size == 32 and not cfg.small_stem  # the cheap stem at 32 px


def test_standard_stem_below_32_px_is_refused():
    with pytest.raises(ConfigError, match="small_stem"):
        preset("v2", "resnet18", input_size=16, small_stem=False)
    assert preset("v2", "resnet18", input_size=16).small_stem  # chosen for it


def test_val_dir_is_decoded_by_worker_processes(tmp_path, monkeypatch):
    """Fails when the labeled folder is decoded image by image in the main process."""
    from factories import make_images

    from training import loaders
    from training.loaders import build_knn

    make_images(tmp_path / "cats", 3)
    make_images(tmp_path / "dogs", 2, seed=1)
    workers = []
    real = loaders.DataLoader

    def spy(*args, **kwargs):
        workers.append(kwargs.get("num_workers", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(loaders, "DataLoader", spy)
    cfg = preset("v2", "resnet18", input_size=16)
    sets = build_knn(cfg, DataOptions(data=str(tmp_path), val_dir=str(tmp_path), workers=2), "cpu")
    assert workers == [2]
    assert sorted(sets.query_labels.tolist()) == [0, 0, 0, 1, 1]
    assert torch.cat(sets.queries).shape == (5, 3, 16, 16)
