"""The photo corpus (training.photos) on a fake package tree: grouping, split, outputs.

The core invariant is that no picture reaches both splits, at any resolution
(``test_no_picture_in_both_splits``). Checked by mutation: letting ``_write_picture`` fall
through from the train branch into the held-out one (its ``return record`` removed) writes
held-out pictures into ``train/`` too, and that test fails on it.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocoretrieval.errors import DatasetError
from mocoretrieval.eval_duplicates import read_groups
from mocoretrieval.walk import walk_images
from training import photos
from training.photo_sources import (
    EXTRAS,
    SOURCES,
    Credit,
    Extra,
    Source,
    extra_files,
    find_pictures,
    free_licence,
    install_line,
)
from training.photos import SPLITS


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A JPEG of random 4x4 blocks: distinct bytes for distinct seeds."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[: size[1], : size[0]]).save(path, quality=95)


def _source(package: str, root: Path, names: list[str]) -> Source:
    """The real table's entry for ``package`` (its layout regex), rooted in the test's tree."""
    real = next(s for s in SOURCES if s.package == package)
    credits = {n: Credit(f"author of {n}", "CC0-1.0" if n == names[0] else None) for n in names}
    return replace(real, root=str(root), pictures=credits)


@pytest.fixture
def tree(tmp_path: Path) -> list[Source]:
    """plasma-like multi-resolution folders (one size a symlink) and MATE/lomiri flat files."""
    plasma = tmp_path / "wallpapers"
    names = [f"P{i}" for i in range(8)]
    for i, name in enumerate(names):
        images = plasma / name / "contents" / "images"
        _image(images / "96x60.jpg", (96, 60), seed=i)
        _image(images / "48x30.jpg", (48, 30), seed=100 + i)
        os.symlink("96x60.jpg", images / "64x40.jpg")  # Debian links sizes to one file
        _image(plasma / name / "contents" / "screenshot.jpg", (20, 12), seed=200 + i)
    _image(plasma / "P0" / "contents" / "images_dark" / "96x60.jpg", (96, 60), seed=300)
    _image(plasma / "Art" / "contents" / "images" / "96x60.jpg", (96, 60), seed=301)  # unlisted
    mate = tmp_path / "mate"
    _image(mate / "nature" / "Leaf.jpg", (40, 30), seed=400)
    _image(mate / "nature" / "Leaf_80x60.jpg", (80, 60), seed=401)
    _image(mate / "abstract" / "Swirl.jpg", (40, 30), seed=402)  # not under nature/: not used
    lomiri = tmp_path / "backgrounds"
    for i, name in enumerate(["hill", "lake", "dog"]):
        _image(lomiri / f"{name}_by_Someone.jpg", (30, 50), seed=500 + i)
    return [
        _source("plasma-workspace-wallpapers", plasma, [*names, "P0_dark"]),
        _source("mate-backgrounds", mate, ["Leaf", "Swirl"]),
        _source("lomiri-wallpapers-16.04", lomiri, ["hill", "lake", "dog"]),
    ]


def _prepare(out: Path, sources: list[Source], **kwargs) -> photos.PrepareReport:
    kwargs = {"heldout_fraction": 0.4, "seed": 1, "max_side": 64, **kwargs}
    return photos.prepare(out, sources, **kwargs)


def _manifest(out: Path) -> dict[str, dict]:
    data = json.loads((out / "manifest.json").read_text("utf-8"))
    return {p["id"]: p for p in data["pictures"]}


def test_pictures_grouped(tree):
    plasma, mate, lomiri = (find_pictures(s) for s in tree)
    by_name = {p.name: p for p in plasma}
    assert sorted(by_name) == sorted([f"P{i}" for i in range(8)] + ["P0_dark"])  # no Art
    p0 = by_name["P0"]
    # the symlinked 64x40 is the 96x60 file: two distinct files, the largest first
    assert p0.sizes == [(96, 60), (48, 30)]
    assert [f.name for f in p0.files] == ["96x60.jpg", "48x30.jpg"]
    assert len(by_name["P0_dark"].files) == 1  # images_dark is another picture
    assert [(p.name, p.sizes) for p in mate] == [("Leaf", [(80, 60), (40, 30)])]
    assert sorted(p.name for p in lomiri) == ["dog", "hill", "lake"]


def test_no_picture_in_both_splits(tree, tmp_path):
    out = tmp_path / "out"
    report = _prepare(out, tree)
    manifest = _manifest(out)
    assert sum(c["heldout"] for c in report.pictures.values()) > 0
    assert sum(c["train"] for c in report.pictures.values()) > 0

    # the picture each written file is of: train/PKG/NAME.jpg, heldout/PKG/NAME.EXT,
    # heldout-sizes/PKG/NAME/WxH.EXT
    train, held = ({str(Path(f).with_suffix("")) for f in walk_images(out / d)} for d in SPLITS)
    sizes = {str(Path(f).parent) for f in walk_images(out / "heldout-sizes")}
    assert train.isdisjoint(held) and train.isdisjoint(sizes)
    assert train | held == set(manifest) and sizes == held
    assert {i for i, p in manifest.items() if p["split"] == "train"} == train
    # no source file (any resolution) of a held-out picture is a source of a training one
    hashes = {
        s: {h for p in manifest.values() if p["split"] == s for h in p["sha256"]} for s in SPLITS
    }
    assert hashes["train"].isdisjoint(hashes["heldout"])


def test_same_file_in_two_pictures_is_refused(tree, tmp_path):
    shared = Path(tree[0].root) / "P1" / "contents" / "images" / "96x60.jpg"
    lomiri = Path(tree[2].root)
    (lomiri / "copy_by_Someone.jpg").write_bytes(shared.read_bytes())
    sources = [tree[0], replace(tree[2], pictures={**tree[2].pictures, "copy": Credit("x")})]
    with pytest.raises(DatasetError, match="byte-identical"):
        _prepare(tmp_path / "out", sources)


def test_split_stable_when_a_picture_or_package_is_added(tree, tmp_path):
    _prepare(tmp_path / "a", tree[:2])
    before = {i: p["split"] for i, p in _manifest(tmp_path / "a").items()}
    _image(Path(tree[0].root) / "New" / "contents" / "images" / "96x60.jpg", (96, 60), seed=900)
    plasma = replace(tree[0], pictures={**tree[0].pictures, "New": Credit("someone")})
    _prepare(tmp_path / "b", [plasma, tree[1], tree[2]])
    after = {i: p["split"] for i, p in _manifest(tmp_path / "b").items()}
    assert {i: after[i] for i in before} == before
    assert len(after) == len(before) + 4  # New and the three lomiri pictures
    assert photos.split_of("x/y", 0, 0.25) == photos.split_of("x/y", 0, 0.25)


def test_heldout_sizes_and_groups_complete(tree, tmp_path):
    out = tmp_path / "out"
    _prepare(out, tree)
    folder = out / "heldout-sizes"
    files = walk_images(folder)
    groups = read_groups(folder / "groups.csv", files)  # what `eval duplicates --groups` reads
    assert sorted(groups) == files  # every file listed, nothing else
    for pid, p in _manifest(out).items():
        if p["split"] != "heldout":
            continue
        mine = sorted(f for f, g in groups.items() if g == pid)
        shipped = {tuple(s) for s in p["sizes"]}
        w, h = p["sizes"][0]
        expected = shipped | {(w // f, h // f) for f in photos.DOWNSCALES}
        assert {Image.open(folder / f).size for f in mine} == expected
        assert len(mine) == len(expected) >= 2
        original = out / p["heldout"]  # the largest file, byte for byte
        assert original.read_bytes() == Path(p["source_files"][0]).read_bytes()


def test_manifest_and_licences(tree, tmp_path):
    out = tmp_path / "out"
    _prepare(out, tree)
    manifest = _manifest(out)
    licences_md = (out / "LICENSES.md").read_text("utf-8")
    for pid, p in manifest.items():
        assert p["licence"] and p["author"] and p["licence_file"] and p["source_files"]
        assert pid in licences_md
    assert manifest["plasma-workspace-wallpapers/P0"]["licence"] == "CC0-1.0"  # the override
    assert manifest["plasma-workspace-wallpapers/P1"]["licence"] == "GPL-2+"  # the package's


def test_train_images_respect_max_side(tree, tmp_path):
    out = tmp_path / "out"
    _prepare(out, tree, max_side=50)
    manifest = _manifest(out)
    for f in walk_images(out / "train"):
        size = Image.open(out / "train" / f).size
        p = manifest[str(Path(f).with_suffix(""))]
        original = p["sizes"][0]
        assert max(size) == min(50, max(original))  # downscaled to fit, never enlarged
        assert abs(size[0] / size[1] - original[0] / original[1]) < 0.05


def test_missing_package_reported(tree, tmp_path):
    absent = replace(tree[1], package="not-here", root=str(tmp_path / "nowhere"))
    report = _prepare(tmp_path / "out", [tree[0], absent])
    assert [s.package for s in report.missing] == ["not-here"]
    assert "apt-get install -y not-here" in install_line(report.missing)
    with pytest.raises(DatasetError, match="apt-get install -y not-here"):
        _prepare(tmp_path / "out2", [absent])


def test_rerun_needs_force_and_rebuilds_the_same(tree, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _prepare(out, tree)
    first = (out / "manifest.json").read_bytes()
    with pytest.raises(DatasetError, match="--force"):
        _prepare(out, tree)
    (out / "train" / "stray.jpg").write_bytes(b"x")
    _prepare(out, tree, force=True)
    assert (out / "manifest.json").read_bytes() == first  # reproducible
    assert not (out / "train" / "stray.jpg").exists()  # rebuilt, not patched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="not made by training.photos"):
        _prepare(tmp_path / "mine", tree, force=True)
    monkeypatch.setattr(photos, "SOURCES", tree)
    args = ["prepare", str(out), "--heldout-fraction", "0.4", "--seed", "1", "--max-side", "64"]
    assert photos.main(args) == 1
    assert "error:" in capsys.readouterr().err
    assert photos.main([*args, "--force"]) == 0
    assert "plasma-workspace-wallpapers" in capsys.readouterr().out


@pytest.fixture
def extra(tmp_path: Path) -> Extra:
    """A stellarium-like tree: photographs in one folder, drawings in per-culture folders
    whose info.ini carries each culture's licence."""
    root = tmp_path / "stellarium"
    _image(root / "nebulae" / "default" / "m42.png", (40, 30), seed=600)
    _image(root / "nebulae" / "default" / "m1.jpg", (40, 30), seed=601)
    _image(root / "nebulae" / "default" / "tiny.png", (16, 40), seed=602)  # short side < 20
    cultures = {"open": "CC BY-SA 4.0", "closed": "CC BY-NC-ND 4.0", "blank": "", "nd": "CC BY-ND"}
    for i, (name, licence) in enumerate(cultures.items()):
        folder = root / "skycultures" / name
        _image(folder / "illustrations" / "bear.png", (30, 30), seed=610 + i)
        (folder / "info.ini").write_text(f"[info]\nname = {name}\nlicense = {licence}\n")
    # byte-identical to the open culture's bear, and first in path order: the one kept
    (root / "skycultures" / "open" / "copy.png").write_bytes(
        (root / "skycultures" / "open" / "illustrations" / "bear.png").read_bytes()
    )
    real = next(e for e in EXTRAS if e.package == "stellarium-data")
    return replace(real, root=str(root), min_side=20)


def test_extras_keep_free_licences_large_enough_and_each_file_once(extra):
    files = dict(extra_files(extra))
    assert files == {
        "nebulae/default/m1.jpg": extra.licence,
        "nebulae/default/m42.png": extra.licence,
        "skycultures/open/copy.png": "CC BY-SA 4.0",
    }
    assert free_licence("GNU GPL v2.0 + Free Art License")
    assert not free_licence("CC BY-NC 4.0") and not free_licence("CC BY-ND 4.0")
    assert not free_licence("  ")


def test_write_extras_copies_bytes_with_licences(extra, tmp_path, monkeypatch, capsys):
    out = tmp_path / "extras"
    counts = photos.write_extras(out, [extra])
    assert counts == {"stellarium-data": 3}
    copied = out / "stellarium-data" / "nebulae" / "default" / "m42.png"
    src = Path(extra.root) / "nebulae" / "default" / "m42.png"
    assert copied.read_bytes() == src.read_bytes()
    assert len(walk_images(out)) == 3
    records = json.loads((out / "manifest.json").read_text("utf-8"))["extras"]
    assert {r["file"]: r["licence"] for r in records}[
        "stellarium-data/skycultures/open/copy.png"
    ] == "CC BY-SA 4.0"
    assert "CC BY-SA 4.0" in (out / "LICENSES.md").read_text("utf-8")
    with pytest.raises(DatasetError, match="--force"):
        photos.write_extras(out, [extra])
    absent = replace(extra, root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="apt-get install -y stellarium-data"):
        photos.write_extras(tmp_path / "none", [absent])
    monkeypatch.setattr(photos, "EXTRAS", (extra,))
    assert photos.main(["extras", str(out), "--force"]) == 0
    assert "wrote 3 training-only pictures" in capsys.readouterr().out
