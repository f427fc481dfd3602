"""Batch embedding of files: same vectors as `encoder.embed`, order kept, bad files skipped."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from test_data import (
    make_broken_files,
    make_unreadable,
)  # `conftest` is ambiguous: tests/training has one too

from mocoretrieval import MoCoEncoder
from mocoretrieval.data import load_image
from mocoretrieval.embed import (
    EmbeddedBatch,
    auto_workers,
    default_batch_size,
    iter_embeddings,
    plan_chunks,
    resolve_device,
)
from mocoretrieval.errors import MoCoRetrievalError
from mocoretrieval.walk import walk_images


def _collect(batches: list[EmbeddedBatch]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    paths = [p for b in batches for p in b.paths]
    vectors = np.concatenate([b.vectors for b in batches])
    skipped = [s for b in batches for s in b.skipped]
    return paths, vectors, skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_vectors_equal_encoder_embed_in_input_order(image_folder, tiny_encoder, workers):
    rel = walk_images(image_folder)
    seen: list[int] = []
    batches = list(
        iter_embeddings(
            tiny_encoder, image_folder, rel, batch_size=5, workers=workers, progress=seen.append
        )
    )
    # With workers, the first batch is a quarter size (at least one image per worker).
    assert [len(b) for b in batches] == ([5, 5, 5, 3] if workers == 0 else [2, 5, 5, 5, 1])
    assert seen == [len(b) for b in batches]
    paths, vectors, skipped = _collect(batches)
    assert paths == rel and skipped == []
    assert vectors.dtype == np.float32 and vectors.shape == (len(rel), tiny_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    reference = tiny_encoder.embed(
        [load_image(image_folder / p, tiny_encoder.resize_size) for p in rel]
    )
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_broken_files_are_skipped_with_reasons_and_good_ones_embedded(
    image_folder, tiny_encoder, monkeypatch
):
    from PIL import Image

    root = image_folder
    good = walk_images(root)
    expected = make_broken_files(root)
    expected["secret.jpg"] = make_unreadable(root / "secret.jpg", monkeypatch)
    Image.new("RGB", (80, 80)).save(root / "bomb.png")
    expected["bomb.png"] = "decompression bomb (6400 pixels)"
    (root / "gone.jpg").write_bytes(b"x")
    expected["gone.jpg"] = "vanished"
    rel = walk_images(root)
    (root / "gone.jpg").unlink()  # vanishes between the walk and the decode
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # inherited by the forked workers
    paths, vectors, skipped = _collect(
        list(iter_embeddings(tiny_encoder, root, rel, batch_size=4, workers=2))
    )
    assert paths == good and vectors.shape == (len(good), tiny_encoder.dim)
    reasons = dict(skipped)
    assert sorted(reasons) == sorted(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])


def test_thumbnails_are_aligned_with_paths_and_optional(tmp_path, image_folder, tiny_encoder):
    import io

    from PIL import Image

    make_broken_files(image_folder)
    rel = walk_images(image_folder)
    batches = list(
        iter_embeddings(tiny_encoder, image_folder, rel, batch_size=4, workers=2, thumbnail_size=24)
    )
    for b in batches:
        assert len(b.thumbnails) == len(b.paths)
        for path, blob in zip(b.paths, b.thumbnails):
            decoded = load_image(image_folder / path, tiny_encoder.resize_size)
            decoded.thumbnail((24, 24))
            with Image.open(io.BytesIO(blob)) as thumb:
                assert thumb.format == "JPEG" and thumb.size == decoded.size
    assert sum(len(b.thumbnails) for b in batches) == sum(len(b.paths) for b in batches) > 0
    off = list(iter_embeddings(tiny_encoder, image_folder, rel, workers=0, thumbnail_size=None))
    assert all(b.thumbnails == [] for b in off)


def test_a_batch_of_only_broken_files_still_yields(tmp_path, tiny_encoder):
    make_broken_files(tmp_path)
    rel = walk_images(tmp_path)
    batches = list(iter_embeddings(tiny_encoder, tmp_path, rel, batch_size=2, workers=0))
    assert all(b.vectors.shape == (0, tiny_encoder.dim) for b in batches)
    assert sum(len(b) for b in batches) == len(rel)


def test_nothing_to_embed_yields_nothing(tmp_path, tiny_encoder):
    assert list(iter_embeddings(tiny_encoder, tmp_path, [])) == []


def test_resnet_runs_channels_last_and_vit_does_not(image_folder, tiny_encoder):
    rel = walk_images(image_folder)[:3]
    list(iter_embeddings(tiny_encoder, image_folder, rel, workers=0))
    conv = tiny_encoder.backbone.net.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    vit = MoCoEncoder(arch="vit_small", input_size=32, resize_size=32)
    _, vectors, _ = _collect(list(iter_embeddings(vit, image_folder, rel, workers=0)))
    assert vectors.shape == (3, 384)


def test_any_object_with_the_embedding_protocol_works(image_folder, tiny_encoder):
    class NotAModule:  # what an ONNX runtime backend looks like to iter_embeddings
        preprocess = tiny_encoder.preprocess
        resize_size = tiny_encoder.resize_size
        input_size = tiny_encoder.input_size
        is_resnet = True
        dim = tiny_encoder.dim

        def embed(self, batch):
            assert batch.is_contiguous()  # no channels_last forced on a foreign backend
            return tiny_encoder.embed(batch.contiguous())

    rel = walk_images(image_folder)
    paths, vectors, _ = _collect(list(iter_embeddings(NotAModule(), image_folder, rel)))
    assert paths == rel and vectors.shape == (len(rel), tiny_encoder.dim)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MoCoRetrievalError, match="unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(MoCoRetrievalError, match="--device cpu"):
            resolve_device("cuda")
    else:
        with pytest.raises(MoCoRetrievalError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(MoCoRetrievalError, match="not available"):
            resolve_device("mps")


def test_auto_workers_and_bad_arguments(image_folder, tiny_encoder, monkeypatch):
    assert auto_workers(0) == 0
    monkeypatch.setattr("mocoretrieval.embed.available_cpus", lambda: 8)
    assert auto_workers(1) == 1  # even one file: a decoder crash must not end the run
    assert auto_workers(3) == 3
    assert auto_workers(100) == 4  # CPU: capped, the model needs the cores
    assert auto_workers(100, "cuda") == 7  # GPU: every core but the one feeding it
    monkeypatch.setattr("mocoretrieval.embed.available_cpus", lambda: 1)
    assert auto_workers(100) == 1 and auto_workers(100, "cuda") == 1
    with pytest.raises(MoCoRetrievalError, match="batch_size"):  # at the call, not at next()
        iter_embeddings(tiny_encoder, image_folder, ["a.jpg"], batch_size=0)
    with pytest.raises(MoCoRetrievalError, match="workers"):
        iter_embeddings(tiny_encoder, image_folder, ["a.jpg"], workers=-1)


def test_inference_mode_does_not_leak_to_the_caller(image_folder, tiny_encoder):
    rel = walk_images(image_folder)[:4]
    for _ in iter_embeddings(tiny_encoder, image_folder, rel, batch_size=2, workers=0):
        assert not torch.is_inference_mode_enabled()
        assert torch.is_grad_enabled()


def test_plan_chunks_splits_each_batch_between_workers():
    chunks, per_batch = plan_chunks(11, batch_size=4, parts=2)
    assert chunks == [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9, 10]]
    assert per_batch == [2, 2, 2]
    chunks, per_batch = plan_chunks(5, batch_size=4, parts=8)
    assert chunks == [[0], [1], [2], [3], [4]] and per_batch == [4, 1]
    assert plan_chunks(3, batch_size=8, parts=1) == ([[0, 1, 2]], [1])
    chunks, per_batch = plan_chunks(10, batch_size=4, parts=2, first_batch=2)
    assert chunks == [[0], [1], [2, 3], [4, 5], [6, 7], [8, 9]] and per_batch == [2, 2, 2]


def test_default_batch_size_follows_backend_and_device(tiny_encoder):
    assert default_batch_size(tiny_encoder, "cpu") == 8  # torch on CPU: fastest with small ones
    assert default_batch_size(tiny_encoder, "cuda") == 32
    assert default_batch_size(object(), "cpu") == 32  # e.g. onnxruntime


def test_default_batch_is_what_one_forward_gets(image_folder, tiny_encoder):
    sizes: list[int] = []

    class Recording(torch.nn.Module):  # a torch model on CPU: batches of 8 by default
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_encoder
            self.preprocess, self.resize_size, self.dim = (
                tiny_encoder.preprocess,
                tiny_encoder.resize_size,
                tiny_encoder.dim,
            )

        def embed(self, batch):
            sizes.append(len(batch))
            return self.inner.embed(batch)

    rel = walk_images(image_folder)
    list(iter_embeddings(Recording(), image_folder, rel, workers=0))
    assert sum(sizes) == len(rel) and max(sizes) == min(8, len(rel))


def test_a_file_that_crashes_the_decoder_is_skipped_and_the_run_goes_on(
    image_folder, tiny_encoder, monkeypatch
):
    from mocoretrieval import data

    rel = walk_images(image_folder)
    culprit = rel[7]  # in the third batch: 2 (a quarter batch first), 5, 5, ...
    real_load = data.load_image

    def load_or_crash(path, *args, **kwargs):  # what a segfault in a C decoder does
        if str(path).endswith(culprit):
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_load(path, *args, **kwargs)

    clean = list(iter_embeddings(tiny_encoder, image_folder, rel, batch_size=5, workers=2))
    monkeypatch.setattr(data, "load_image", load_or_crash)  # forked workers inherit it
    batches = list(iter_embeddings(tiny_encoder, image_folder, rel, batch_size=5, workers=2))
    paths, vectors, skipped = _collect(batches)
    assert [p for p, _ in skipped] == [culprit]
    assert skipped[0][1].startswith("crashed the decoder")
    assert paths == [p for p in rel if p != culprit]
    assert len(batches) == len(clean)  # one per batch of files, as always: the caller commits
    want = dict(zip(*_collect(clean)[:2], strict=True))
    np.testing.assert_allclose(vectors, np.stack([want[p] for p in paths]), atol=1e-5)
