"""The onnxruntime backend: export parity, self-contained files, backend choice, export cache."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from factories import make_images
from PIL import Image

from mocoretrieval import MoCoEncoder
from mocoretrieval import onnx_cache as oc
from mocoretrieval import onnx_export as ox
from mocoretrieval.errors import BackendError
from mocoretrieval.models import choose_backend, load_backend
from mocoretrieval.onnx_backend import OnnxEncoder
from mocoretrieval.onnx_export import export_onnx, sidecar_path


def make_tiny_encoder(arch: str = "resnet18") -> MoCoEncoder:
    """The recipe of conftest's ``tiny_encoder``, so both share cached exports. (Not imported:
    ``conftest`` is ambiguous, tests/training has one too.)"""
    return MoCoEncoder(
        arch=arch, input_size=32, resize_size=36, small_stem=arch.startswith("resnet")
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def images():
    """Random-texture images of varied sizes and aspect ratios, landscape and portrait, as
    decoded from JPEG: the PIL preprocessing path must match too."""
    import io

    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(64, 48)] * 6 + [(40, 80)] * 5):
        base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        arr = np.kron(base, np.ones((h // 4, w // 4, 1), dtype=np.uint8))
        arr = (arr + rng.integers(0, 30, arr.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG" if i % 2 else "PNG")
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


@pytest.fixture(scope="module")
def cache_dir():
    # The session's model cache (conftest points it at a temporary folder): the CLI tests below
    # then reuse the exports of the tests above instead of exporting the same weights again.
    return oc.default_cache_dir()


@pytest.fixture(scope="module")
def resnet_export(cache_dir):
    """The tiny ResNet exported into the shared cache (exports are slow: tests share this one).

    Seeded like every test, so its weights, hence its cache entry, are ``tiny_encoder``'s.
    """
    torch.manual_seed(0)
    encoder = make_tiny_encoder("resnet18")
    return encoder, oc.cached_onnx(encoder, cache_dir)


@pytest.mark.parametrize("arch", ["resnet18", "vit_small"])
def test_export_matches_torch_per_image(arch, tmp_path, images, resnet_export):
    if arch == "resnet18":
        encoder, path = resnet_export
    else:
        encoder = make_tiny_encoder(arch)
        path = export_onnx(encoder, tmp_path / "vit.onnx")
    onnx_encoder = OnnxEncoder.from_file(path)

    expected = encoder.embed(images)
    got = onnx_encoder.embed(images)
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(images), encoder.dim)
    assert _cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # The batch axis is dynamic: one image and an odd batch of tensors work too.
    batch = torch.stack([encoder.preprocess(im) for im in images[:3]])
    assert _cosines(onnx_encoder.embed(images[:1]), expected[:1]).min() >= 0.9999
    assert _cosines(onnx_encoder.embed(batch), expected[:3]).min() >= 0.9999
    assert onnx_encoder.weights_hash() == encoder.weights_hash()
    assert onnx_encoder.dim == encoder.dim and onnx_encoder.is_resnet == encoder.is_resnet


def test_config_that_contradicts_the_graph_is_refused(resnet_export):
    encoder, path = resnet_export
    # dim, is_resnet and is_vit are derived from the config (EncoderConfigMixin), so a config
    # describing another output than the graph's must not be taken at its word.
    head = {"num_layers": 1, "hidden_dim": 16, "out_dim": 16}
    config = {**encoder.config, "embedding": "projection", "head": head}
    with pytest.raises(BackendError, match="export it again"):
        OnnxEncoder(path, config=config)
    assert OnnxEncoder(path, config=encoder.config).dim == encoder.dim


def _graph_fields(config: dict) -> dict:
    """A config's fields that shape the exported graph (those of the ONNX cache key)."""
    return {k: v for k, v in config.items() if k not in oc.KEY_IGNORES}


def test_file_is_self_contained(tmp_path, resnet_export, images):
    encoder, path = resnet_export
    # One file holds every weight: no external-data files next to it.
    assert {p.name for p in path.parent.iterdir() if p.name.startswith(path.stem)} == {
        path.name,
        sidecar_path(path).name,
    }
    side = json.loads(sidecar_path(path).read_text())
    assert side["weights_hash"] == encoder.weights_hash()
    # The fields that shape the graph (the cache key's): an export of the same weights made
    # earlier in the session from another source is this one's, and records that source.
    assert _graph_fields(side["config"]) == _graph_fields(encoder.config.to_dict())
    assert side["opset"] >= 17

    # Moved alone (no sidecar), the metadata inside the file rebuilds the preprocessing.
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(path.read_bytes())
    moved = OnnxEncoder.from_file(alone)
    assert _graph_fields(moved.config.to_dict()) == _graph_fields(encoder.config.to_dict())
    t_onnx, t_torch = moved.preprocess(images[0]), encoder.preprocess(images[0])
    assert torch.equal(t_onnx, t_torch)
    assert (moved.input_size, moved.resize_size, moved.mean, moved.std) == (
        encoder.input_size,
        encoder.resize_size,
        encoder.mean,
        encoder.std,
    )


def test_sidecar_is_used_when_metadata_is_stripped(tmp_path, resnet_export):
    import onnx

    encoder, path = resnet_export
    model = onnx.load(str(path))
    del model.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(model, str(stripped))
    with pytest.raises(BackendError, match="export-onnx"):
        OnnxEncoder.from_file(stripped)
    sidecar_path(stripped).write_text(sidecar_path(path).read_text())
    assert OnnxEncoder.from_file(stripped).weights_hash() == encoder.weights_hash()


def test_newer_format_is_refused(tmp_path, resnet_export):
    _, path = resnet_export
    meta = json.loads(sidecar_path(path).read_text())
    meta["format_version"] = ox.FORMAT_VERSION + 1
    with pytest.raises(BackendError, match="upgrade"):
        ox._parse_metadata(path, {ox.META_PREFIX + k: json.dumps(v) for k, v in meta.items()})


def test_opset_below_17_is_refused(tmp_path, tiny_encoder):
    with pytest.raises(BackendError, match="opset"):
        export_onnx(tiny_encoder, tmp_path / "m.onnx", opset=13)


# --- backend choice ---------------------------------------------------------------------------


def test_auto_is_onnx_on_cpu_and_torch_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == ("onnx", "cpu")
    assert choose_backend("torch") == ("torch", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == ("torch", "cuda")
    assert choose_backend("auto", "cpu") == ("onnx", "cpu")
    assert choose_backend("onnx") == ("onnx", "cpu")  # the default onnxruntime is CPU-only
    with pytest.raises(BackendError, match="torch, onnx, auto"):
        choose_backend("tensorrt")


@pytest.fixture
def export_calls(monkeypatch):
    calls = []
    real = oc.export_onnx

    def counting(encoder, path, *args, **kwargs):
        calls.append(path)
        return real(encoder, path, *args, **kwargs)

    monkeypatch.setattr(oc, "export_onnx", counting)
    return calls


def test_load_backend_auto(monkeypatch, cache_dir, resnet_export, tiny_encoder, export_calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = load_backend(tiny_encoder, "auto", cache_dir=cache_dir)
    assert isinstance(on_cpu, OnnxEncoder) and on_cpu.path == resnet_export[1]

    # With a GPU, auto keeps torch and exports nothing (the move to the GPU is mocked).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moved = []
    monkeypatch.setattr(tiny_encoder, "to", lambda device: moved.append(device) or tiny_encoder)
    on_gpu = load_backend(tiny_encoder, "auto", cache_dir=cache_dir)
    assert on_gpu is tiny_encoder and moved == ["cuda"] and not export_calls


def test_cache_is_reused_and_invalidated_by_new_weights(cache_dir, images, export_calls):
    encoder = make_tiny_encoder()
    first = load_backend(encoder, "onnx", cache_dir=cache_dir)
    mtime, exports = first.path.stat().st_mtime_ns, len(export_calls)  # 0 after resnet_export
    second = load_backend(encoder, "onnx", cache_dir=cache_dir)
    assert len(export_calls) == exports and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert first.path.name.startswith(encoder.weights_hash()[:32])

    with torch.no_grad():
        encoder.backbone.net.conv1.weight.mul_(1.5)
    changed = load_backend(encoder, "onnx", cache_dir=cache_dir)
    assert len(export_calls) == exports + 1 and changed.path != first.path
    assert changed.weights_hash() == encoder.weights_hash() != first.weights_hash()
    assert _cosines(changed.embed(images), encoder.embed(images)).min() >= 0.9999


def test_damaged_cache_file_is_exported_again(tmp_path, resnet_export, monkeypatch):
    encoder, good = resnet_export
    damaged = tmp_path / good.name
    damaged.write_bytes(b"not a model")
    calls = []

    def fake_export(encoder, path):  # a copy of the good export: the real one is slow
        calls.append(path)
        shutil.copy(good, path)
        shutil.copy(sidecar_path(good), sidecar_path(path))
        return path

    monkeypatch.setattr(oc, "export_onnx", fake_export)
    again = load_backend(encoder, "onnx", cache_dir=tmp_path)
    assert calls == [damaged] and again.weights_hash() == encoder.weights_hash()


def test_load_backend_from_source_and_onnx_file(
    cache_dir, resnet_export, tiny_encoder_dir, export_calls
):
    torch_encoder = load_backend(str(tiny_encoder_dir), "torch", device="cpu")
    assert isinstance(torch_encoder, MoCoEncoder)
    # Same weights as resnet_export: its cached file serves, under this encoder's source.
    onnx_encoder = load_backend(str(tiny_encoder_dir), "onnx", cache_dir=cache_dir)
    assert onnx_encoder.path == resnet_export[1] and not export_calls
    assert onnx_encoder.weights_hash() == torch_encoder.weights_hash()
    assert onnx_encoder.source == torch_encoder.source is not None
    reopened = load_backend(str(onnx_encoder.path), "auto", device="cpu")
    assert reopened.weights_hash() == torch_encoder.weights_hash()
    with pytest.raises(BackendError, match="ONNX model"):
        load_backend(str(onnx_encoder.path), "torch")
    with pytest.raises(BackendError, match="onnxruntime"):
        load_backend(tiny_encoder_dir, "torch", quantize="int8")


# --- int8 -------------------------------------------------------------------------------------


def test_int8_is_calibrated_once_and_close_to_fp32(
    cache_dir, resnet_export, image_folder, images, export_calls
):
    encoder, fp32_file = resnet_export
    paths = sorted(image_folder.rglob("*.jpg")) + sorted(image_folder.rglob("*.png"))
    with pytest.raises(BackendError, match="--quantize int8"):
        load_backend(encoder, "auto", cache_dir=cache_dir, quantize="int8")

    q = load_backend(
        encoder, "auto", cache_dir=cache_dir, quantize="int8", calibration_images=paths
    )
    assert isinstance(q, OnnxEncoder) and q.quantize == "int8" and q.path.name.endswith("int8.onnx")
    assert q.weights_hash() == encoder.weights_hash()
    assert q.meta["calibration_images"] == len(paths)
    assert _cosines(q.embed(images), encoder.embed(images)).min() > 0.99
    # The int8 file is smaller: its conv weights are stored as bytes.
    assert q.path.stat().st_size < 0.5 * fp32_file.stat().st_size

    again = load_backend(encoder, "auto", cache_dir=cache_dir, quantize="int8")  # no images needed
    assert again.path == q.path and not export_calls
    with pytest.raises(BackendError, match="unknown quantization"):
        load_backend(encoder, "onnx", cache_dir=cache_dir, quantize="int4")


# --- command line -----------------------------------------------------------------------------


def test_cli_export_onnx_writes_a_usable_file(tmp_path, tiny_encoder_dir, images, capsys):
    from mocoretrieval.cli import main

    out = tmp_path / "out" / "tiny.onnx"
    assert main(["export-onnx", str(tiny_encoder_dir), str(out)]) == 0
    assert out.is_file() and sidecar_path(out).is_file()
    assert str(out) in capsys.readouterr().out
    reference = MoCoEncoder.from_pretrained(tiny_encoder_dir)
    exported = OnnxEncoder.from_file(out)
    assert _cosines(exported.embed(images), reference.embed(images)).min() >= 0.9999

    assert main(["export-onnx", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 1
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("built_with, searched_with", [("onnx", "torch"), ("torch", "auto")])
def test_index_from_one_backend_is_searchable_with_the_other(
    built_with, searched_with, tmp_path, image_folder, tiny_encoder_dir, capsys
):
    from mocoretrieval.cli import main

    index = tmp_path / "index"
    argv = ["index", str(image_folder), "--model", str(tiny_encoder_dir), "--index", str(index)]
    assert main([*argv, "--backend", built_with, "-q"]) == 0
    capsys.readouterr()
    queries = sorted(image_folder.glob("*.jpg"))[:3]
    search = ["search", *map(str, queries), "--index", str(index), "-k", "3", "--json"]
    assert main([*search, "--backend", searched_with]) == 0
    for query, found in zip(queries, json.loads(capsys.readouterr().out)):
        top = found["results"][0]
        assert os.path.samefile(top["path"], query)
        assert top["score"] >= 0.9999  # the same image, embedded by the other backend


def test_index_with_int8_calibrates_on_the_folder(tmp_path, image_folder, tiny_encoder_dir, capsys):
    from mocoretrieval.cli import main

    for old in oc.default_cache_dir().glob("*-int8.onnx"):
        old.unlink()  # calibrate here, on this folder
    index = tmp_path / "index"
    argv = ["index", str(image_folder), "--model", str(tiny_encoder_dir), "--index", str(index)]
    assert main([*argv, "--quantize", "int8", "-q"]) == 0
    (int8,) = oc.default_cache_dir().glob("*-int8.onnx")
    assert OnnxEncoder.from_file(int8).meta["calibration_images"] == 18  # every image: 12 + 6
    capsys.readouterr()
    query = min(image_folder.glob("*.png"))
    assert main(["search", str(query), "--index", str(index), "--backend", "torch", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert os.path.samefile(top["path"], query) and top["score"] > 0.99
    # Another folder is calibrated on its own images, not served the first folder's model.
    other = tmp_path / "other"
    make_images(other, 5, seed=9)
    assert main(["index", str(other), "--model", str(tiny_encoder_dir), "--quantize", "int8"]) == 0
    files = sorted(oc.default_cache_dir().glob("*-int8.onnx"))
    assert len(files) == 2
    counts = sorted(OnnxEncoder.from_file(f).meta["calibration_images"] for f in files)
    assert counts == [5, 18]


def test_int8_calibration_honours_the_ignore_rules(tmp_path, image_folder, tiny_encoder_dir):
    """int8 is calibrated on the images the update indexes: `--exclude` patterns (given, then
    kept in the index) and `.mocoretrievalignore` files leave theirs out. Broken on purpose:
    `_calibration` walking without `patterns` calibrates on sub/ too (9 images, not 6), and
    ignoring the manifest's patterns when none are given does too (the cache key changes)."""
    from mocoretrieval.cli import main

    for old in oc.default_cache_dir().glob("*-int8.onnx"):
        old.unlink()
    (image_folder / ".mocoretrievalignore").write_text("*.png\n")  # 6 of the root's 12
    index = tmp_path / "index"
    argv = ["index", str(image_folder), "--model", str(tiny_encoder_dir), "--index", str(index)]
    assert main([*argv, "--exclude", "sub/", "--quantize", "int8", "-q"]) == 0
    (int8,) = oc.default_cache_dir().glob("*-int8.onnx")
    assert OnnxEncoder.from_file(int8).meta["calibration_images"] == 6
    (image_folder / "sub" / "img_0002.jpg").unlink()  # an update with work to do
    assert main([*argv, "--quantize", "int8", "-q"]) == 0  # the index's --exclude: same model
    assert list(oc.default_cache_dir().glob("*-int8.onnx")) == [int8]
