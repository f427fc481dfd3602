"""`python -m training.export CHECKPOINT OUT_DIR [--push-to-hub REPO_ID]`: a run's base encoder
as a `MoCoEncoder` in the ``save_pretrained`` layout, with its training record in the card."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mocoretrieval.encoder import MoCoEncoder
from mocoretrieval.errors import CheckpointError, MoCoRetrievalError
from mocoretrieval.sources import encoder_with_weights

from . import checkpoint as ckpt_io

_PREFIX = "base_encoder."


def encoder_from_checkpoint(path: str | Path) -> MoCoEncoder:
    """The trained base encoder of a checkpoint (the momentum encoder and predictor are left).

    Its ``extra`` holds the training config, the data, the epochs trained and the kNN accuracy
    measured on the labeled validation set, which the model card shows.
    """
    state = ckpt_io.load(path)
    weights = {k[len(_PREFIX) :]: v for k, v in state["model"].items() if k.startswith(_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} holds no base encoder ('{_PREFIX}*' tensors)")
    knn = state.get("knn") or []
    trained = [h for h in knn if h["epoch"] > 0]  # epoch 0 is the random init's floor
    floor = next((h for h in knn if h["epoch"] == 0), {})
    cfg = state["config"]
    measured = None
    if trained:
        measured = (
            f"kNN top-1 {trained[-1]['knn_acc']:.4f} (k={cfg['knn_k']}, T={cfg['knn_t']}) after "
            f"epoch {trained[-1]['epoch']}"
        )
        if floor:
            measured += (
                f"; random init {floor['knn_acc']:.4f}, raw pixels {floor['pixels_knn_acc']:.4f}"
            )
    extra: dict[str, Any] = {
        "trained_with": "mocoretrieval training.pretrain",
        "epochs_trained": state["epoch"],
        "steps": state["step"],
        "world_size": state.get("world_size", 1),
        "data": state.get("data"),
        "knn_accuracy": trained[-1]["knn_acc"] if trained else None,
        "knn_random_init": floor.get("knn_acc"),
        "knn_pixels": floor.get("pixels_knn_acc"),
        "measured": measured,
        "knn": {"k": state["config"]["knn_k"], "t": state["config"]["knn_t"], "history": knn},
        "training_config": state["config"],
    }
    config = dict(state["encoder_config"], extra=extra)
    config["source"] = f"mocoretrieval training.pretrain ({state['epoch']} epochs)"
    return encoder_with_weights(config, weights, str(path)).eval()


def save_half(encoder: MoCoEncoder, out_dir: str | Path) -> None:
    """Rewrites ``out_dir/model.safetensors`` with float16 storage (half the bytes); loading
    converts it back to the encoder's float32."""
    from safetensors.torch import save_file

    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in encoder.state_dict().items()
    }
    save_file(state, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})


def write_encoder(
    encoder: MoCoEncoder, out_dir: str | Path, half: bool = False, card: str | Path | None = None
) -> None:
    """Saves ``encoder`` as an encoder folder: float16 storage with ``half`` (its weights are
    rounded in place first, so that ``weights_hash()`` matches the loaded encoder's), ``card``
    appended to the generated model card."""
    if half:
        with torch.no_grad():
            for t in encoder.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    encoder.save_pretrained(out_dir)
    if half:
        save_half(encoder, out_dir)
    if card is not None:
        readme = Path(out_dir) / "README.md"
        readme.write_text(readme.read_text().rstrip() + "\n\n" + Path(card).read_text())


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    push_to_hub: str | None = None,
    private: bool = False,
    half: bool = False,
    card: str | Path | None = None,
) -> MoCoEncoder:
    """Writes the checkpoint's encoder to ``out_dir`` and, with a repo id, uploads it.

    Args:
        half: store the weights as float16 (the encoder loads them as float32).
        card: a Markdown file (data, licences, command, measurements) appended to the
            generated model card.

    Returns:
        The exported encoder (float32, and with ``half`` holding the float16-rounded weights,
        as they will load).
    """
    if push_to_hub and (half or card):
        raise MoCoRetrievalError(
            "--push-to-hub uploads the encoder as it is in memory (float32, the generated card); "
            "to publish a --half/--card export, upload its folder: "
            f"`huggingface-cli upload {push_to_hub} {out_dir}`"
        )
    encoder = encoder_from_checkpoint(checkpoint)
    write_encoder(encoder, out_dir, half=half, card=card)
    if push_to_hub:
        try:
            encoder.push_to_hub(push_to_hub, private=private)
        except Exception as e:  # huggingface_hub raises HTTP, auth and offline errors
            raise MoCoRetrievalError(
                f"the encoder is saved in {out_dir} but the upload to {push_to_hub!r} failed "
                f"({e}); log in with `huggingface-cli login` (or set HF_TOKEN), check the repo "
                f"id, then run `python -m training.export {checkpoint} {out_dir} "
                f"--push-to-hub {push_to_hub}` again"
            ) from e
    return encoder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a pretraining checkpoint's base encoder as a MoCoEncoder "
        "(config.json, model.safetensors, README.md), optionally to the Hugging Face Hub.",
    )
    p.add_argument(
        "checkpoint", help="checkpoint.pth written by training.pretrain (or its run folder)"
    )
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument("--card", metavar="MD", help="Markdown appended to the model card")
    args = p.parse_args(argv)
    try:
        encoder = export(
            args.checkpoint, args.out_dir, args.push_to_hub, args.private, args.half, args.card
        )
    except MoCoRetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    acc = encoder.extra.get("knn_accuracy")
    print(
        f"wrote MoCo {encoder.moco_version} {encoder.arch} ({encoder.dim}-d) to {args.out_dir}"
        + (f"; kNN accuracy {acc:.4f}" if acc is not None else "")
        + (f"; uploaded to {args.push_to_hub}" if args.push_to_hub else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
