"""Issue 13, defect 12: config.json is validated on load, with a clear one-line error, and no
non-finite vector is ever stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import make_images, make_tiny_encoder

from mocoretrieval import cli
from mocoretrieval.index import ImageIndex
from mocoretrieval.store import FileStat, Store

BAD = {
    "std": ([0.0, 0.0, 0.0], "std must be > 0"),
    "mean": ([0.5, 0.5], "mean must be 3 numbers"),
    "input_size": (6000, "input_size 6000 is outside"),
    "resize_size": ("256", "resize_size must be an integer"),
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_config_is_one_line_naming_the_field(tmp_path, capsys, field):
    """Fails without the fix: std 0 indexed NaN vectors silently, a 2-value mean gave a raw
    traceback at the first batch, input_size 6000 tried to allocate 4.6 GB per batch of 2."""
    encoder_dir = tmp_path / "encoder"
    make_tiny_encoder().save_pretrained(encoder_dir)
    config = json.loads((encoder_dir / "config.json").read_text())
    value, message = BAD[field]
    config[field] = value
    (encoder_dir / "config.json").write_text(json.dumps(config))
    root = tmp_path / "photos"
    make_images(root, 2)
    args = ["index", str(root), "--model", str(encoder_dir), "--backend", "torch", "-q"]
    assert cli.main([*args, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (root / ".mocoretrieval" / "index.db").exists()


def test_a_non_finite_embedding_is_skipped_never_stored(tmp_path, monkeypatch):
    """Fails without the fix: the NaN vector was stored and searched."""
    root = tmp_path / "photos"
    make_images(root, 3)
    encoder = make_tiny_encoder()
    real_embed = encoder.embed

    def embed(batch):
        out = np.array(real_embed(batch), dtype=np.float32)
        out[0] = np.nan  # e.g. a model whose normalisation divides by zero
        return out

    monkeypatch.setattr(encoder, "embed", embed)
    index = ImageIndex.build(root, model=encoder, workers=0, batch_size=8)
    reason = "embedding is not finite (NaN or infinity): check the model's config"
    assert index.last_report.skipped == {reason: ["img_0000.jpg"]}
    assert len(index) == 2 and np.isfinite(index.store.all_vectors()[1]).all()
    with pytest.raises(ValueError, match="non-finite"):  # the store refuses one too
        Store(index.store.path, index.dim).add_batch(
            ["x.jpg"], np.full((1, index.dim), np.inf, np.float32), [FileStat(1, 1)]
        )
