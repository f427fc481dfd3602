"""training.distill: invariant targets, a student that gains the invariance, resume, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import make_images, make_tiny_encoder
from PIL import Image

from mocoretrieval import MoCoEncoder
from mocoretrieval.errors import CheckpointError
from training import distill as D


def _teacher():
    # The standard stem at 32 px: fast enough to train a few epochs in a test.
    return make_tiny_encoder(small_stem=False).eval()


def _clean_batch(encoder, folder):
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    return encoder.preprocess.batch([Image.open(p).convert("RGB") for p in files])


def test_targets_are_exactly_flip_invariant():
    """Breaking it: with `view` ignoring "flip", the target of a mirrored batch differs from
    the batch's: checked, it fails."""
    enc = _teacher()
    x = torch.randn(6, 3, 32, 32)
    a = D.invariant_targets(enc, x)
    b = D.invariant_targets(enc, torch.flip(x, dims=[3]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(6))
    one = D.invariant_targets(enc, x, views=("identity",))
    assert not torch.allclose(one, D.invariant_targets(enc, torch.flip(x, dims=[3]), ("identity",)))


def test_gray_view_is_pils_grayscale():
    """The gray view of a normalised batch is the normalised batch of PIL's grayscale image."""
    enc = _teacher()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8))
    pre = enc.preprocess
    ours = D.view(pre.batch([img]), "gray", enc.mean, enc.std)
    pils = pre.batch([img.convert("L").convert("RGB")])
    # Both round to whole levels (PIL its luma, the resize each channel): within 1.5 levels,
    # in normalised units. The plain mean of the channels is off by up to ~60 levels here.
    assert (ours - pils).abs().max() < 1.5 / 255 / min(enc.std)
    torch.testing.assert_close(
        D.view(pre.batch([img]), "gray-flip", enc.mean, enc.std), torch.flip(ours, dims=[3])
    )


def test_student_gains_the_invariance_the_teacher_lacks(tmp_path):
    """Breaking it: with `opt.step()` deleted (the student stays the teacher), the student is
    no closer to the targets and no more flip-invariant than the teacher: checked, it fails."""
    folder = tmp_path / "imgs"
    make_images(folder, 32, size=(48, 48))
    teacher = _teacher()
    cfg = D.DistillConfig(epochs=4, batch_size=8, lr=0.05, crop_min=0.6)
    student = D.distill(teacher, folder, tmp_path / "run", cfg, workers=0, precision="fp32")
    x = _clean_batch(teacher, folder)
    targets = D.invariant_targets(teacher, x)

    def report(enc):
        with torch.no_grad():
            z = F.normalize(enc(x), dim=1)
            zf = F.normalize(enc(torch.flip(x, dims=[3])), dim=1)
            zg = F.normalize(enc(D.view(x, "gray", enc.mean, enc.std)), dim=1)
        return (z * targets).sum(1).mean(), (z * zf).sum(1).mean(), (z * zg).sum(1).mean()

    t_target, t_flip, t_gray = report(teacher)
    s_target, s_flip, s_gray = report(student)
    assert s_target > t_target + 0.01
    assert s_flip > t_flip + 0.005
    assert s_gray > t_gray
    # The teacher is untouched, and the student records where it came from.
    assert student.extra["distilled"]["epochs"] == 4
    assert student.weights_hash() != teacher.weights_hash()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    """Breaking it: without restoring the RNG state (or the optimizer's momentum) the resumed
    student's weights differ from the uninterrupted one's: checked."""
    folder = tmp_path / "imgs"
    make_images(folder, 16, size=(48, 48))
    teacher = _teacher()
    cfg = D.DistillConfig(epochs=2, batch_size=8, lr=0.05)
    straight = D.distill(teacher, folder, tmp_path / "a", cfg, workers=0, precision="fp32")

    save = D.ckpt_io.save_atomic

    def save_then_stop(state, path):
        save(state, path)
        if path.name == D.CHECKPOINT:
            raise KeyboardInterrupt

    monkeypatch.setattr(D.ckpt_io, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        D.distill(teacher, folder, tmp_path / "b", cfg, workers=0, precision="fp32")
    monkeypatch.setattr(D.ckpt_io, "save_atomic", save)
    with pytest.raises(CheckpointError, match="--resume"):
        D.distill(teacher, folder, tmp_path / "b", cfg, workers=0, precision="fp32")
    D.ckpt_io.seed_all(123)  # a new process: its RNGs are not where the run left them
    resumed = D.distill(
        teacher, folder, tmp_path / "b", cfg, resume=True, workers=0, precision="fp32"
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    other = D.DistillConfig(epochs=3, batch_size=8, lr=0.05)
    with pytest.raises(CheckpointError, match="another teacher or recipe"):
        D.distill(teacher, folder, tmp_path / "b", other, resume=True, workers=0)


def test_cli_writes_a_loadable_half_precision_encoder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    make_images(folder, 16, size=(48, 48))
    teacher_dir = tmp_path / "teacher"
    _teacher().save_pretrained(teacher_dir)
    run = tmp_path / "run"
    argv = [
        str(teacher_dir),
        "--data",
        str(folder),
        "--out-dir",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--half",
    ]
    assert D.main(argv) == 0
    enc = MoCoEncoder.from_pretrained(run / "encoder")
    assert enc.extra["distilled"]["teacher"] == str(teacher_dir)
    assert "distill" in enc.source
    assert '"distilled"' in (run / "encoder" / "README.md").read_text()
    assert D.main([*argv, "--views", "identity,sideways"]) == 1
    assert "views are some of" in capsys.readouterr().err
