"""MoCoEncoder: embeddings, preprocessing from config, save/load round trip, Hub upload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import make_tiny_encoder
from PIL import Image

from mocoretrieval import MoCoEncoder
from mocoretrieval.backbones import sincos_pos_embed_2d

HEAD = {
    "num_layers": 2,
    "hidden_dim": 32,
    "out_dim": 16,
    "batch_norm": True,
    "last_bn": True,
    "bias": False,
}


@pytest.mark.parametrize("arch", ["resnet18", "vit_small"])
def test_save_pretrained_round_trip_gives_identical_embeddings(tmp_path, arch):
    encoder = make_tiny_encoder(arch, head=HEAD, embedding="projection", extra={"knn": 0.5})
    encoder.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["arch"] == arch and config["head"] == HEAD and config["input_size"] == 32
    loaded = MoCoEncoder.from_pretrained(tmp_path / "out")
    images = [Image.new("RGB", (40, 50), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 90, 9))]
    np.testing.assert_array_equal(loaded.embed(images), encoder.embed(images))
    assert loaded.weights_hash() == encoder.weights_hash()
    assert '"knn": 0.5' in (tmp_path / "out" / "README.md").read_text()


def test_embed_is_l2_normalised_float32_for_any_image_mode(tiny_encoder):
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA"]
    images = [Image.new(m, (37, 53)) for m in modes]
    out = tiny_encoder.embed(images)
    assert out.shape == (len(modes), 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_embed_tensor_batch_equals_pil_path(tiny_encoder):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    batch = tiny_encoder.preprocess(image)[None]
    np.testing.assert_allclose(tiny_encoder.embed(batch), tiny_encoder.embed([image]), atol=1e-6)


def test_preprocess_follows_config():
    encoder = make_tiny_encoder(
        input_size=24, resize_size=30, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    x = encoder.preprocess(Image.new("RGB", (90, 60), (255, 255, 255)))
    assert x.shape == (3, 24, 24)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25


def test_weights_hash_tracks_weights(tiny_encoder):
    before = tiny_encoder.weights_hash()
    assert before == tiny_encoder.weights_hash()
    with torch.no_grad():
        next(tiny_encoder.parameters()).add_(1e-3)
    assert tiny_encoder.weights_hash() != before


def test_invalid_configs_raise_with_the_fix():
    with pytest.raises(ValueError, match="needs a projection head"):
        MoCoEncoder(arch="resnet18", embedding="projection")
    with pytest.raises(ValueError, match="choose one of"):
        MoCoEncoder(arch="resnet101")


def test_vit_uses_moco_v3_configuration():
    encoder = make_tiny_encoder("vit_small")
    net = encoder.backbone.net
    assert net.blocks[0].attn.num_heads == 12 and net.embed_dim == 384
    assert not net.pos_embed.requires_grad
    torch.testing.assert_close(net.pos_embed.data, sincos_pos_embed_2d(2, 384))


def test_push_to_hub_uploads_the_saved_layout(monkeypatch, tiny_encoder):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo_id"] = repo_id
            uploaded["files"] = sorted(p.name for p in folder_path.iterdir())
            uploaded["config"] = json.loads((folder_path / "config.json").read_text())
            return "https://huggingface.co/" + repo_id

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    url = tiny_encoder.push_to_hub("someone/tiny")
    assert url.endswith("someone/tiny")
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"]["arch"] == "resnet18"
