"""models.py: a model source becomes an embedder in one place, and indexes open through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import make_images, make_tiny_encoder

from mocoretrieval import DeferredModel, Embedder, EncoderConfig, MoCoEncoder, models, sources
from mocoretrieval.cli import main
from mocoretrieval.errors import ConfigError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import read_manifest
from mocoretrieval.onnx_backend import OnnxEncoder
from mocoretrieval.onnx_export import export_onnx, read_metadata
from mocoretrieval.sources import BUNDLED, DEFAULT_MODEL

# --- EncoderConfig --------------------------------------------------------------------------


def test_encoder_config_round_trips_through_config_json_onnx_metadata_and_manifest(tmp_path):
    encoder = make_tiny_encoder(head={"num_layers": 2, "hidden_dim": 16, "out_dim": 8})
    config = encoder.config
    assert isinstance(config, EncoderConfig)
    # config.json: the file holds to_dict(), and from_dict gives the same config back.
    encoder.save_pretrained(tmp_path / "enc")
    on_disk = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert on_disk == config.to_dict() and EncoderConfig.from_dict(on_disk) == config
    loaded = MoCoEncoder.from_pretrained(tmp_path / "enc").config
    assert loaded == config.replace(source=str(tmp_path / "enc"))  # the provenance it records
    # ONNX metadata: the same object, and OnnxEncoder rebuilds the dataclass from it.
    path = export_onnx(encoder, tmp_path / "enc.onnx")
    assert read_metadata(path)["config"] == config.to_dict()
    assert OnnxEncoder(path).config == config
    # The index manifest's encoder entry.
    root = tmp_path / "photos"
    make_images(root, 2)
    ImageIndex.build(root, model=encoder, workers=0).close()
    entry = read_manifest(root / ".mocoretrieval")["encoder"]
    assert (
        entry["config"] == config.to_dict() and EncoderConfig.from_dict(entry["config"]) == config
    )


def test_encoder_config_reads_as_its_json_object_and_derives_dim():
    config = EncoderConfig(arch="resnet18", input_size=32, resize_size=36, mean=[0.5] * 3)
    assert config.mean == (0.5, 0.5, 0.5) and config["mean"] == [0.5, 0.5, 0.5]
    assert config["arch"] == "resnet18" and dict(config) == config.to_dict()
    assert (config.dim, config.is_resnet, config.is_vit) == (512, True, False)
    projection = config.replace(embedding="projection", head={"out_dim": 16})
    assert projection.dim == 16 and config.dim == 512  # frozen: replace() copies


def test_shipped_config_json_keeps_its_format():
    on_disk = json.loads((BUNDLED[DEFAULT_MODEL] / "config.json").read_text())
    assert EncoderConfig.from_dict(on_disk).to_dict() == on_disk


def test_unknown_config_field_says_to_upgrade():
    with pytest.raises(ConfigError, match="upgrade"):
        EncoderConfig.from_dict({"arch": "resnet18", "future_field": 1})


# --- the Embedder protocol ------------------------------------------------------------------


def test_both_encoder_kinds_are_embedders(tmp_path, tiny_encoder):
    onnx_encoder = OnnxEncoder(export_onnx(tiny_encoder, tmp_path / "tiny.onnx"))
    for encoder in (tiny_encoder, onnx_encoder):
        assert isinstance(encoder, Embedder)
    assert not isinstance(object(), Embedder)
    # OnnxEncoder's fields come from its config, as MoCoEncoder has them.
    for name in ("arch", "input_size", "resize_size", "mean", "std", "moco_version"):
        assert getattr(onnx_encoder, name) == getattr(tiny_encoder, name)
    with pytest.raises(AttributeError):
        onnx_encoder.no_such_field  # noqa: B018


# --- the index receives its model -----------------------------------------------------------


def test_index_given_a_string_resolves_it_through_models(tmp_path, monkeypatch, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 2)
    asked: list[tuple[str, str | None]] = []

    def load_model(source, device=None):
        asked.append((str(source), device))
        return tiny_encoder

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("index called sources"))
    index = ImageIndex.build(root, model="some/encoder", workers=0, device="cpu")
    assert asked == [("some/encoder", "cpu")] and len(index) == 2


def test_unchanged_folder_loads_no_model(tmp_path, monkeypatch, tiny_encoder_dir):
    root = tmp_path / "photos"
    make_images(root, 2)
    models.open_index(root=root, model=str(tiny_encoder_dir), backend="torch").update(workers=0)

    def no_model(*args, **kwargs):
        pytest.fail("a model was loaded for an unchanged folder")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(models, "load_backend", no_model)
    for backend in ("torch", "onnx"):
        index = models.open_index(root=root, backend=backend)
        assert index.update(workers=0).added == []
    # With onnx the index's own model is deferred: loaded only for work.
    assert isinstance(models.index_model(None, "onnx", index_dir=root), DeferredModel)


def test_cli_opens_every_index_through_open_index(tmp_path, monkeypatch, capsys, tiny_encoder_dir):
    root = tmp_path / "photos"
    make_images(root, 3)
    calls: list[dict] = []
    real = models.open_index

    def recording(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "open_index", recording)
    model = ["--model", str(tiny_encoder_dir), "--backend", "torch", "--workers", "0", "-q"]
    assert main(["index", str(root), *model]) == 0
    assert calls[-1]["root"] == str(root) and calls[-1]["model"] == str(tiny_encoder_dir)
    query = str(next(Path(root).glob("*.jpg")))
    commands = [
        ["search", query, "--index", str(root), "--backend", "torch"],
        ["duplicates", "--index", str(root)],
        ["info", "--index", str(root)],
    ]
    for argv in commands:
        assert main(argv) == 0, capsys.readouterr().err
    assert [c["args"] for c in calls[1:]] == [(str(root),)] * 3
    assert all("root" not in c for c in calls[1:])


def test_app_opens_its_index_through_open_index(tmp_path, monkeypatch, tiny_encoder):
    pytest.importorskip("gradio")
    from app import server

    root = tmp_path / "photos"
    make_images(root, 2)
    ImageIndex.build(root, model=tiny_encoder, workers=0).close()
    calls = []
    monkeypatch.setattr(
        models,
        "open_index",
        lambda *a, **k: calls.append((a, k)) or ImageIndex.open(root, model=tiny_encoder),
    )
    index = server.open_index(root, backend="torch", device="cpu")
    assert calls == [((root,), {"backend": "torch", "device": "cpu", "notify": None})]
    assert index.encoder is tiny_encoder
