"""Issue 13, defects 8 and 14: a cached ONNX export proves its content before use, and a cache
folder that cannot be written falls back to torch with a one-line notice."""

from __future__ import annotations

import json

import numpy as np
import onnx
from factories import make_images
from PIL import Image

from mocoretrieval import cli
from mocoretrieval.encoder import MoCoEncoder
from mocoretrieval.index import ImageIndex
from mocoretrieval.models import load_backend
from mocoretrieval.onnx_backend import OnnxEncoder
from mocoretrieval.onnx_export import file_sha256, sidecar_path


def test_a_tampered_cached_export_is_exported_again(tmp_path, two_models):
    """Defect 8. Fails without the fix: the altered file still carried the right weights hash
    in its metadata, so it was used, and embedded differently from the model."""
    cache = tmp_path / "cache"
    reference = MoCoEncoder.from_pretrained(str(two_models[0]))
    first = load_backend(str(two_models[0]), "onnx", "cpu", cache_dir=cache)
    assert isinstance(first, OnnxEncoder)
    path = first.path
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weights = np.frombuffer(init.raw_data, dtype=np.float32) * -3.0  # same shape, other values
    init.raw_data = weights.astype(np.float32).tobytes()
    onnx.save(model, str(path))  # metadata_props (weights hash, config) kept as they were

    again = load_backend(str(two_models[0]), "onnx", "cpu", cache_dir=cache)
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "navy")]
    np.testing.assert_allclose(again.embed(images), reference.embed(images), atol=1e-4)
    assert json.loads(sidecar_path(path).read_text())["file_sha256"] == file_sha256(path)


def test_an_unwritable_cache_falls_back_to_torch_in_one_line(
    tmp_path, two_models, monkeypatch, capsys, caplog
):
    """Defect 14. Fails without the fix: the default `search` died with a raw OSError
    traceback (PermissionError for a read-only home; here a file where the folder goes)."""
    root = tmp_path / "photos"
    make_images(root, 3)
    ImageIndex.build(root, model=two_models[0], workers=0).close()
    (tmp_path / "blocked").write_text("a file, not a folder")
    monkeypatch.setenv("MOCORETRIEVAL_CACHE", str(tmp_path / "blocked"))
    query = str(root / "img_0001.png")
    assert cli.main(["search", query, "--index", str(root), "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["results"][0]["path"].endswith("img_0001.png")
    # One warning (the CLI's log format prints it as one "WARNING: ..." line on stderr).
    notice = [r.getMessage() for r in caplog.records if "ONNX cache" in r.getMessage()]
    assert len(notice) == 1 and "torch instead" in notice[0], notice
    assert "Traceback" not in captured.err
