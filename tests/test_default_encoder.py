"""The encoder shipped inside the package: present, small, loaded offline by its alias, the
default of a new index, and installed by a non-editable `pip install .`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from factories import make_images, make_tiny_encoder
from PIL import Image

from mocoretrieval import MoCoEncoder
from mocoretrieval.cli import main
from mocoretrieval.sources import BUNDLED, DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if args else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_default_model_ships_with_the_package():
    assert DEFAULT_MODEL in BUNDLED
    folder = BUNDLED[DEFAULT_MODEL]
    weights = folder / "model.safetensors"
    assert weights.is_file() and (folder / "config.json").is_file()
    assert weights.stat().st_size <= 25 * 2**20
    card = (folder / "README.md").read_text()
    for needed in ("python -m training.pretrain", "Licen", "recall@1", "held out"):
        assert needed in card, needed


def test_the_alias_loads_offline_as_float32(no_network):
    encoder = MoCoEncoder.from_pretrained(DEFAULT_MODEL)
    assert encoder.source == DEFAULT_MODEL
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    from safetensors import safe_open

    with safe_open(str(BUNDLED[DEFAULT_MODEL] / "model.safetensors"), "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert "F16" in stored and "F32" not in stored  # half the bytes on disk
    # the alias and the folder it names are the same encoder
    same = MoCoEncoder.from_pretrained(BUNDLED[DEFAULT_MODEL])
    assert same.weights_hash() == encoder.weights_hash()
    x = torch.rand(2, 3, encoder.input_size, encoder.input_size)
    with torch.no_grad():
        out = encoder(x)
    assert out.shape == (2, encoder.dim) and torch.isfinite(out).all()


def _edited_copy(src: Path, dst: Path) -> None:
    """A 75% centre crop, downscaled to half and saved as a low-quality JPEG."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    box = (w // 8, h // 8, w - w // 8, h - h // 8)
    img.crop(box).resize((w * 3 // 8, h * 3 // 8)).save(dst, "JPEG", quality=40)


def test_index_then_search_an_edited_copy_offline(tmp_path, capsys, no_network):
    """The issue's promise: with no network and no --model, `index` then `search` of an edited
    copy finds its original first."""
    root = tmp_path / "photos"
    paths = make_images(root, 10, size=(160, 120))
    assert main(["index", str(root), "--workers", "0", "-q"]) == 0
    manifest = json.loads((root / ".mocoretrieval" / "manifest.json").read_text())
    assert manifest["encoder"]["source"] == DEFAULT_MODEL
    for original in paths[:4]:
        copy = tmp_path / f"copy-of-{original.stem}.jpg"
        _edited_copy(original, copy)
        capsys.readouterr()
        assert main(["search", str(copy), "--index", str(root), "-k", "3", "--json"]) == 0
        (answer,) = json.loads(capsys.readouterr().out)
        assert Path(answer["results"][0]["path"]).name == original.name


def test_an_index_keeps_its_pinned_model_when_the_default_changes(tmp_path, monkeypatch):
    """An index made before the default changed goes on with the model it was built with."""
    torch.manual_seed(3)
    make_tiny_encoder().save_pretrained(tmp_path / "old-default")
    root = tmp_path / "photos"
    make_images(root, 4)
    monkeypatch.setattr("mocoretrieval.sources.DEFAULT_MODEL", str(tmp_path / "old-default"))
    assert main(["index", str(root), "--workers", "0", "-q", "--backend", "torch"]) == 0
    monkeypatch.undo()
    make_images(root / "more", 2, seed=5)
    assert main(["index", str(root), "--workers", "0", "-q", "--backend", "torch"]) == 0
    manifest = json.loads((root / ".mocoretrieval" / "manifest.json").read_text())
    assert Path(manifest["encoder"]["source"]).name == "old-default"
    assert manifest["encoder"]["dim"] != MoCoEncoder.from_pretrained(DEFAULT_MODEL).dim or (
        manifest["encoder"]["weights_hash"]
        != MoCoEncoder.from_pretrained(DEFAULT_MODEL).weights_hash()
    )


@pytest.mark.slow
def test_a_built_wheel_carries_the_weights(tmp_path):
    """`pip install .` (not editable) installs from a wheel: the weights must be inside it."""
    src = tmp_path / "src"  # a copy of what git tracks, so the build leaves the checkout alone
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "mocoretrieval", "training", "app"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("mocoretrieval-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    folder = f"mocoretrieval/weights/{DEFAULT_MODEL}"
    for f in ("config.json", "model.safetensors", "README.md"):
        assert f"{folder}/{f}" in names, f


def test_a_missing_shipped_file_says_how_to_repair(tmp_path, monkeypatch):
    from mocoretrieval.errors import SourceError

    monkeypatch.setitem(BUNDLED, DEFAULT_MODEL, tmp_path / "gone")
    with pytest.raises(SourceError, match="reinstall"):
        MoCoEncoder.from_pretrained(DEFAULT_MODEL)
