"""`mocoretrieval eval` on generated images: known answers from stand-in encoders, the
pipeline's skipping and reuse, the labeled-folder errors, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from factories import make_images

import mocoretrieval.eval_duplicates as eval_duplicates_module
import mocoretrieval.evaluate as evaluate_module
from mocoretrieval.cli import main
from mocoretrieval.errors import DatasetError
from mocoretrieval.eval_embed import RAW_PIXELS, RawPixels, embed_files
from mocoretrieval.evaluate import ALL, eval_copies, eval_duplicates, eval_knn
from mocoretrieval.walk import walk_images


class ConstantEncoder(RawPixels):
    """Every image gets the same vector: no encoder can do worse."""

    def embed(self, images):
        return np.full((len(images), self.dim), 1 / math.sqrt(self.dim), np.float32)


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    make_images(root, 12)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.fixture
def oracle(monkeypatch, photos):
    """A perfect encoder stand-in: identity features. The pipeline runs (decoding, skipping),
    then each image's vector is the one-hot of the original it shows: itself for the folder's
    images, the image it was made from for a copy."""
    files = walk_images(photos)
    shows: dict[str, str] = {str(photos / f): f for f in files}

    def make_copies(root, originals, out_dir, *args, **kwargs):
        copies, skipped = real_make(root, originals, out_dir, *args, **kwargs)
        shows.update({str(Path(out_dir) / c.path): c.original for c in copies})
        return copies, skipped

    def embed_files(encoder, root, relpaths, **kwargs):
        got = real_embed(encoder, root, relpaths, **kwargs)
        if encoder is not stand_in:
            return got
        ids = [files.index(shows[str(Path(root) / p)]) for p in got.paths]
        got.vectors = np.eye(len(files), dtype=np.float32)[ids]
        return got

    stand_in = RawPixels(16)
    real_make, real_embed = evaluate_module.make_copies, evaluate_module.embed_files
    for module in (evaluate_module, eval_duplicates_module):
        monkeypatch.setattr(module, "make_copies", make_copies)
        monkeypatch.setattr(module, "embed_files", embed_files)
    return stand_in


def test_copies_perfect_encoder_scores_one_and_broken_files_are_counted(photos, oracle):
    """Finding the wrong original (e.g. ``targets`` rolled by one in eval_copies) fails it."""
    report = eval_copies(photos, [oracle], n=5, seed=1, workers=0)
    assert report.originals == 5 and report.gallery == 12
    assert report.skipped == [("broken.jpg", "not an image")]
    (result,) = report.results
    assert result.run.skipped == 1
    assert set(result.scores) == set(report.kinds) and report.kinds[-1] == ALL
    for kind, scores in result.scores.items():
        assert scores.recall == {1: 1.0, 5: 1.0, 10: 1.0} and scores.mean_ap == 1.0, kind
    assert result.scores[ALL].queries == 5 * (len(report.kinds) - 1)


@pytest.fixture
def heldout(photos):
    make_images(photos / "heldout", 3, seed=9)
    return photos


def test_copies_of_a_sub_folder_search_the_whole_folder(heldout, oracle, monkeypatch):
    """``copies_of``: copies only of the sub-folder's images, searched among every image (the
    rest are distractors). Ignoring it (copying from the whole folder) fails the first assert."""
    photos, made = heldout, []
    real = evaluate_module.make_copies

    def spy(root, originals, out_dir, *args, **kwargs):
        copies, skipped = real(root, originals, out_dir, *args, **kwargs)
        made.extend(c.original for c in copies)
        return copies, skipped

    monkeypatch.setattr(evaluate_module, "make_copies", spy)
    report = eval_copies(photos, [oracle], n=10, copies_of="heldout", workers=0)
    assert made and all(f.startswith("heldout/") for f in made)
    assert report.originals == 3 and report.gallery == 15
    assert report.results[0].scores[ALL].recall[1] == 1.0
    with pytest.raises(DatasetError, match="no images under"):
        eval_copies(photos, [oracle], n=2, copies_of="nothere", workers=0)


def test_copies_constant_encoder_scores_chance(photos):
    report = eval_copies(photos, [ConstantEncoder(16)], n=4, workers=0)
    scores = report.results[0].scores[ALL]
    assert scores.recall == pytest.approx({1: 1 / 12, 5: 5 / 12, 10: 10 / 12})


def test_copies_with_a_tiny_encoder_and_raw_pixels_side_by_side(photos, tiny_encoder):
    report = eval_copies(photos, [tiny_encoder, RAW_PIXELS], n=3, workers=0, backend="torch")
    assert [r.model for r in report.results][1] == RAW_PIXELS
    for r in report.results:
        assert 0 < r.scores[ALL].recall[1] <= r.scores[ALL].recall[10] <= 1
    assert report.to_dict()["results"][1]["scores"]["flip"]["queries"] == 3


def test_stored_embeddings_of_the_same_model_are_reused(photos, tiny_encoder):
    from mocoretrieval import ImageIndex

    index = ImageIndex.create(photos, tiny_encoder)
    index.update(workers=0)
    index.close()
    files = walk_images(photos)
    fresh = embed_files(tiny_encoder, photos, files, reuse=False, workers=0)
    stored = embed_files(tiny_encoder, photos, files, workers=0)
    assert stored.reused == 12 and fresh.reused == 0
    assert stored.paths == fresh.paths and stored.skipped == fresh.skipped
    np.testing.assert_allclose(stored.vectors, fresh.vectors, atol=1e-5)
    (photos / "img_0003.png").write_bytes((photos / "img_0005.png").read_bytes())  # changed
    again = embed_files(tiny_encoder, photos, files, workers=0)
    assert again.reused == 11
    assert embed_files(RawPixels(16), photos, files, workers=0).reused == 0  # another model


def _labeled(root: Path, sizes: dict[str, int]) -> Path:
    for i, (name, n) in enumerate(sizes.items()):
        make_images(root / name, n, seed=i)
    return root


def test_knn_on_a_labeled_folder_has_a_raw_pixel_floor(tmp_path):
    """Images of one class differ by noise only (a flat colour per class): raw pixels find
    their class; the leave-one-out protocol holds each image out of its own vote."""
    from PIL import Image

    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (tmp_path / f"c{c}").mkdir()
        rng = np.random.default_rng(c)
        for i in range(4):
            noise = rng.integers(-25, 25, (24, 24, 3))
            arr = (np.array(colour) + noise).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / f"c{c}" / f"{i}.png")
    report = eval_knn(tmp_path, [ConstantEncoder(8)], ks=(1, 3), workers=0)
    raw, const = report.results
    assert raw.model == RAW_PIXELS and report.queries == 12 and report.bank is None
    assert raw.scores.accuracy == {1: 1.0, 3: 1.0} and raw.scores.retrieval.mean_ap == 1.0
    assert const.scores.retrieval.mean_ap < 0.5


def test_labeled_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="at least two"):
        eval_knn(_labeled(tmp_path / "one", {"cats": 3}), [])
    with pytest.raises(DatasetError, match="dogs .*fewer than two"):
        eval_knn(_labeled(tmp_path / "lonely", {"cats": 3, "dogs": 1}), [])
    with pytest.raises(DatasetError, match="either"):
        eval_knn(None, [])


def test_knn_on_fashion_mnist_without_exporting_images():
    report = eval_knn(dataset="fashion-mnist", models=[], ks=(20,), limit=300)
    (raw,) = report.results
    assert report.bank == 300 and report.queries == 300 and len(report.classes) == 10
    assert raw.scores.accuracy[20] > 0.5  # chance is 0.1; raw pixels reach ~0.85 in full


def test_duplicates_perfect_and_constant(photos, oracle):
    report = eval_duplicates(photos, [oracle, ConstantEncoder(8)], n=3, workers=0)
    perfect, const = report.results
    assert report.positives == 3 * 9 * 8 // 2  # each original with its 8 copies
    assert perfect.recommended is not None and perfect.at_recommended == (1.0, 1.0)
    n = report.images
    assert n == 12 + 3 * 8  # the broken file is not among them
    # Every pair ties: one threshold groups everything, and every pair is found.
    assert const.curve.precision.tolist() == pytest.approx([report.positives / (n * (n - 1) / 2)])
    assert const.recommended is None


def test_duplicates_pools_draws_of_copies(photos, oracle, tmp_path, capsys, monkeypatch):
    """Two draws (seeds 1 and 2) are two sets of copies, each scored with the folder's images
    and pooled: twice the known pairs, still all found by a perfect encoder; a constant
    encoder's pooled precision is the pairs of both draws over all they found."""
    seeds, make = [], eval_duplicates_module.make_copies
    monkeypatch.setattr(
        eval_duplicates_module, "make_copies", lambda *a, **k: seeds.append(a[4]) or make(*a, **k)
    )
    report = eval_duplicates(photos, [oracle, ConstantEncoder(8)], n=3, seed=1, draws=2, workers=0)
    assert seeds == [1, 2]  # each draw its own edits
    perfect, const = report.results
    one = 3 * 9 * 8 // 2
    assert report.positives == 2 * one and report.images == 12 + 2 * 3 * 8
    assert report.groups_from == "copies: standard, n=3, seeds=1-2"
    assert perfect.at_recommended == (1.0, 1.0)
    found = 2 * ((12 + 3 * 8) * (12 + 3 * 8 - 1) // 2)  # each draw: every pair of its images
    assert const.curve.precision.tolist() == pytest.approx([2 * one / found])
    with pytest.raises(DatasetError, match="--draws"):
        eval_duplicates(photos, [oracle], groups=photos / "groups.csv", draws=2)
    argv = ["eval", "duplicates", str(photos), "--model", RAW_PIXELS, "--n", "1", "--draws", "2"]
    assert main([*argv, "--workers", "0", "--json", "--plot", str(tmp_path / "pr.png")]) == 0
    assert json.loads(capsys.readouterr().out)["groups_from"].endswith("n=1, seeds=0-1")


def test_cli_copies_json_and_knn_error(photos, tiny_encoder_dir, tmp_path, capsys):
    argv = ["eval", "copies", str(photos), "--model", str(tiny_encoder_dir), "--model"]
    argv += [RAW_PIXELS, "--n", "2", "--backend", "torch", "--workers", "0", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in out["results"]] == [str(tiny_encoder_dir), RAW_PIXELS]
    assert out["skipped"] == [["broken.jpg", "not an image"]]
    assert main(["eval", "knn", str(_labeled(tmp_path / "one", {"cats": 3}))]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_duplicates_with_groups_csv_draws_a_plot(photos, tmp_path, capsys):
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group\nimg_0000.jpg,a\nimg_0001.png,a\nimg_0002.jpg,b\n")
    plot = tmp_path / "pr.png"
    argv = ["eval", "duplicates", str(photos), "--groups", str(groups), "--model", RAW_PIXELS]
    assert main([*argv, "--plot", str(plot), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 known duplicate pairs" in out and plot.read_bytes()[:4] == b"\x89PNG"
    groups.write_text("nothere.jpg,a\n")
    assert main([*argv, "--plot", str(plot)]) == 1
    assert "nothere.jpg" in capsys.readouterr().err


def test_duplicates_curve_counts_what_the_index_groups(photos, tiny_encoder):
    """At any threshold, the pairs the curve counts as found are the pairs that
    ImageIndex.duplicates puts in one group (connected components, not single pairs)."""
    from itertools import combinations

    from mocoretrieval import ImageIndex
    from mocoretrieval.metrics import duplicate_precision_recall

    index = ImageIndex.create(photos, tiny_encoder)
    index.update(workers=0)
    files = walk_images(photos)
    got = embed_files(tiny_encoder, photos, files, workers=0)  # the index's own vectors
    known = [int(p[4:8]) % 3 for p in got.paths]  # any known grouping will do
    curve = duplicate_precision_recall(got.vectors, known)
    group_of = dict(zip(got.paths, known))
    for t in curve.thresholds[[2, len(curve.thresholds) // 2, -3]] - 1e-5:
        found = [
            (a, b)
            for g in index.duplicates(float(t))
            for a, b in combinations([Path(r.path).name for r in g], 2)
        ]
        right = sum(group_of[a] == group_of[b] for a, b in found)
        assert curve.at(float(t)) == pytest.approx((right / len(found), right / curve.positives))
    index.close()
