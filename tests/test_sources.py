"""from_pretrained on every accepted source, against independent reference models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from mocoretrieval import (
    CheckpointError,
    MoCoEncoder,
    SourceError,
    UnsafeCheckpointError,
)
from mocoretrieval.backbones import ResNetBackbone
from mocoretrieval.sources import OFFICIAL, _detect_arch

# --- reference: the official builders, written out independently of mocoretrieval ---------


def official_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco-v3 builder.py `_build_mlp`, as published."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def official_resnet(version: str) -> nn.Module:
    net = torchvision.models.resnet50(num_classes=128)  # v1: fc 2048 -> 128
    if version == "v2":
        net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    elif version == "v3":
        net.fc = official_mlp(2, 2048, 4096, 256)
    return net


def official_vit(arch: str) -> nn.Module:
    name = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}[arch]
    net = timm.create_model(name, pretrained=False, num_heads=12, num_classes=0)
    net.head = official_mlp(3, net.embed_dim, 4096, 256)
    return net


def randomize_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Non-trivial BN statistics, so that a wrong mapping cannot pass by accident."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in state.items():
        if k.endswith("running_mean"):
            v = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        out[k] = v.clone()
    return out


def save_official(path: Path, version: str, arch: str, prefix: str = "module.", extras=True):
    """Writes a checkpoint laid out like the released .pth.tar files; returns the query model."""
    net = official_resnet(version) if arch == "resnet50" else official_vit(arch)
    net.load_state_dict(randomize_stats(net.state_dict()))
    net.eval()
    own = net.state_dict()
    if version in ("v1", "v2"):
        state = {f"{prefix}encoder_q.{k}": v for k, v in own.items()}
        if extras:
            state.update({f"{prefix}encoder_k.{k}": v.clone() for k, v in own.items()})
            state[f"{prefix}queue"] = nn.functional.normalize(torch.randn(128, 16), dim=0)
            state[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    else:
        state = {f"{prefix}base_encoder.{k}": v for k, v in own.items()}
        if extras:
            state.update({f"{prefix}momentum_encoder.{k}": v.clone() for k, v in own.items()})
            predictor = official_mlp(2, 256, 4096, 256, last_bn=arch != "resnet50")
            state.update({f"{prefix}predictor.{k}": v for k, v in predictor.state_dict().items()})
    torch.save({"epoch": 1, "arch": arch, "state_dict": state, "optimizer": {"state": {}}}, path)
    return net


def reference_embedding(net: nn.Module, x: torch.Tensor, projection: bool) -> np.ndarray:
    with torch.no_grad():
        if isinstance(net, torchvision.models.ResNet):
            head, net.fc = net.fc, nn.Identity()
            feats = net(x)
            net.fc = head
            out = head(feats) if projection else feats
        else:
            feats = net.forward_head(net.forward_features(x), pre_logits=True)
            out = net.head(feats) if projection else feats
    return nn.functional.normalize(out, dim=1).numpy()


LAYOUTS = [
    ("v1", "resnet50", "module."),
    ("v2", "resnet50", ""),
    ("v3", "resnet50", "module."),
    ("v3", "vit_small", "module."),
    ("v3", "vit_base", "module."),
]


@pytest.mark.parametrize("version,arch,prefix", LAYOUTS)
def test_official_checkpoint_matches_reference(tmp_path, version, arch, prefix):
    path = tmp_path / "ckpt.pth.tar"
    ref = save_official(path, version, arch, prefix, extras=arch != "vit_base")
    x = torch.randn(2, 3, 224, 224)
    for projection in (False, True):
        kwargs = {"embedding": "projection"} if projection else {}
        encoder = MoCoEncoder.from_pretrained(path, **kwargs)
        assert (encoder.moco_version, encoder.arch) == (version, arch)
        got = encoder.embed(x)
        want = reference_embedding(ref, x, projection)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet34"])
def test_basic_block_resnets_are_told_apart_by_their_blocks(arch):
    # Same layer names and widths; only the number of blocks per stage differs.
    body = ResNetBackbone(arch).net.state_dict()
    assert _detect_arch(body, "checkpoint") == arch


def test_convert_then_save_pretrained_round_trip(tmp_path):
    from mocoretrieval.cli import main

    path = tmp_path / "r-50.pth.tar"
    save_official(path, "v2", "resnet50")
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out)]) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    direct = MoCoEncoder.from_pretrained(path)
    again = MoCoEncoder.from_pretrained(out)
    x = torch.randn(2, 3, 224, 224)
    np.testing.assert_array_equal(direct.embed(x), again.embed(x))
    assert again.weights_hash() == direct.weights_hash()
    assert "MoCo v2" in (out / "README.md").read_text()


def test_missing_tensor_raises(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    save_official(path, "v1", "resnet50", extras=False)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["module.encoder_q.layer2.0.bn1.running_var"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="missing.*layer2.0.bn1.running_var"):
        MoCoEncoder.from_pretrained(path)


def test_unexpected_tensor_in_saved_directory_raises(tmp_path, tiny_encoder_dir):
    from safetensors.torch import load_file, save_file

    weights = tiny_encoder_dir / "model.safetensors"
    state = load_file(str(weights))
    state["backbone.net.extra.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="unexpected.*extra.weight"):
        MoCoEncoder.from_pretrained(tiny_encoder_dir)


class _RunsCode:
    """A pickle payload that would create a file when unpickled, if it were ever run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": _RunsCode(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        MoCoEncoder.from_pretrained(path)
    assert not marker.exists()


def _fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lays out a huggingface_hub cache entry as a download would."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snapshot / name)


def test_hub_id_loads_offline_from_cache(tmp_path, tiny_encoder, tiny_encoder_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    _fill_hub_cache(cache, "someone/tiny-moco", tiny_encoder_dir)
    loaded = MoCoEncoder.from_pretrained("someone/tiny-moco", cache_dir=cache)
    x = torch.randn(3, 3, 32, 32)
    np.testing.assert_array_equal(loaded.embed(x), tiny_encoder.embed(x))
    assert loaded.source == "someone/tiny-moco"


def test_hub_id_not_cached_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="local copy"):
        MoCoEncoder.from_pretrained("someone/not-cached", cache_dir=tmp_path)


def test_official_alias_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SourceError, match="r-50-1000ep.pth.tar"):
        MoCoEncoder.from_pretrained("moco-v3-r50-1000ep")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mocoretrieval" / "r-50-1000ep.pth.tar"
    cached.parent.mkdir(parents=True)
    save_official(cached, "v3", "resnet50", extras=False)
    encoder = MoCoEncoder.from_pretrained("moco-v3-r50-1000ep")
    assert (encoder.moco_version, encoder.source) == ("v3", "moco-v3-r50-1000ep")


def test_unknown_source_lists_accepted_forms(tmp_path):
    with pytest.raises(SourceError) as info:
        MoCoEncoder.from_pretrained(tmp_path / "nope.pth.tar")
    message = str(info.value)
    assert "save_pretrained" in message and "Hub" in message and next(iter(OFFICIAL)) in message


def test_directory_without_weights_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(SourceError, match="model.safetensors"):
        MoCoEncoder.from_pretrained(tmp_path)
