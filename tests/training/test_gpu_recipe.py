"""benchmarks/train_gpu.py's recipes build: a device call that dies on a recipe error spends
GPU time lent once, so the recipe and ``--set`` parsing are checked here, on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from training.config import named_preset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_gpu.py"


@pytest.fixture(scope="module")
def train_gpu():
    spec = importlib.util.spec_from_file_location("train_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_recipes_build_with_the_small_stem_resnet18(train_gpu, version):
    cfg = train_gpu.recipe(version, 512, 40)
    assert (cfg.version, cfg.arch, cfg.small_stem) == (version, "resnet18", True)
    assert (cfg.batch_size, cfg.epochs, cfg.knn_every) == (512, 40, 8)


def test_v2_recipe_is_the_cpu_presets_row_but_for_the_network(train_gpu):
    cpu, gpu = named_preset("fmnist-cpu"), train_gpu.recipe("v2", 256, 10)
    fields = ("T", "head_bn", "queue_size", "m", "weight_decay", "lr", "crop_min")
    for name in (*fields, "solarize_p", "jitter", "jitter_p"):
        assert getattr(gpu, name) == getattr(cpu, name), name
    assert gpu.arch == "resnet18"  # the GPU runs' network, whatever the CPU row trains


def test_set_overrides_the_network_and_recipe_fields(train_gpu):
    overrides = dict(train_gpu.parse_override(t) for t in ("arch=resnet10", "T=0.1"))
    cfg = train_gpu.recipe("v2", 512, 10, **overrides)
    assert (cfg.arch, cfg.T, cfg.small_stem) == ("resnet10", 0.1, True)
    assert train_gpu.recipe("v3", 512, 10, **overrides).arch == "resnet10"
    with pytest.raises(argparse.ArgumentTypeError, match="set by the script"):
        train_gpu.parse_override("epochs=3")
