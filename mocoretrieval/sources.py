"""Resolves a model source (directory, Hub id, official checkpoint, alias) into a `MoCoEncoder`.

What a source is, how an official checkpoint converts, and strict loading live here; the
``save_pretrained`` layout (config.json, model.safetensors, README.md: written, read, fetched from
the Hub) is ``hub.py``'s.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import hub
from .encoder import MoCoEncoder
from .errors import CheckpointError, SourceError, UnsafeCheckpointError

_FB = "https://dl.fbaipublicfiles.com"
_V1V2 = f"{_FB}/moco/moco_checkpoints"
# The checkpoints facebookresearch released, by the alias users type.
OFFICIAL: dict[str, str] = {
    "moco-v1-r50-200ep": f"{_V1V2}/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar",
    "moco-v2-r50-200ep": f"{_V1V2}/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar",
    "moco-v2-r50-800ep": f"{_V1V2}/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
    "moco-v3-r50-100ep": f"{_FB}/moco-v3/r-50-100ep/r-50-100ep.pth.tar",
    "moco-v3-r50-300ep": f"{_FB}/moco-v3/r-50-300ep/r-50-300ep.pth.tar",
    "moco-v3-r50-1000ep": f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
    "moco-v3-vit-s-300ep": f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
    "moco-v3-vit-b-300ep": f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
}
# Encoders shipped inside the package (save_pretrained layout, package data): no download.
BUNDLED_DIR = Path(__file__).parent / "weights"
BUNDLED: dict[str, Path] = {"moco-v2-r18-photos": BUNDLED_DIR / "moco-v2-r18-photos"}
# The model of a new index when none is given: shipped, so the main job works offline.
DEFAULT_MODEL = "moco-v2-r18-photos"
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ACCEPTED = (
    "Accepted model sources:\n"
    "  - a directory written by MoCoEncoder.save_pretrained (config.json + model.safetensors)\n"
    "  - a Hugging Face Hub repo id in that layout, e.g. 'user/moco-v3-r50'\n"
    "  - an official facebookresearch MoCo v1/v2/v3 checkpoint file (*.pth.tar)\n"
    f"  - an alias of an encoder shipped with mocoretrieval: {', '.join(BUNDLED)}\n"
    f"  - an alias of an official release: {', '.join(OFFICIAL)}"
)


def normalize_source(source: str | os.PathLike) -> str:
    """A model source as an index records it: a local path expanded (``~``) and made absolute,
    so that it is found again from any folder; an alias or Hub id as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def load(
    source: str | Path, *, device: str | torch.device = "cpu", **overrides: Any
) -> MoCoEncoder:
    """Detects what ``source`` is and loads it strictly; see :data:`ACCEPTED`.

    Args:
        source: directory, Hub repo id, checkpoint path or official alias.
        device: where to put the encoder.
        overrides: config fields to change (e.g. ``embedding="projection"``); for Hub ids,
            ``revision``, ``cache_dir`` and ``token`` are passed to huggingface_hub instead.
    """
    hub_kwargs = {k: overrides.pop(k) for k in ("revision", "cache_dir", "token") if k in overrides}
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        encoder = _load_directory(path, overrides)
    elif path.is_file():
        encoder = load_official_checkpoint(path, **overrides)
    elif text in BUNDLED:
        encoder = _load_bundled(text, overrides)
    elif text in OFFICIAL:
        encoder = load_official_checkpoint(_download_official(text), **overrides)
        encoder.source = text
    elif _HUB_ID.match(text) and not text.endswith(CHECKPOINT_SUFFIXES):
        encoder = _load_hub(text, overrides, hub_kwargs)
    else:
        raise SourceError(
            f"cannot load a model from {text!r}: no such file or directory.\n{ACCEPTED}"
        )
    encoder.loaded_from = normalize_source(text)
    return encoder.to(device).eval()


# --- save_pretrained layout (directory, package data or Hub) -------------------------------


def _load_bundled(alias: str, overrides: dict[str, Any]) -> MoCoEncoder:
    folder = BUNDLED[alias]
    if not (folder / "model.safetensors").is_file():
        raise SourceError(
            f"the encoder {alias!r} ships with mocoretrieval but {folder} lacks its weights: the "
            "installation is incomplete: reinstall it (`pip install --force-reinstall "
            "mocoretrieval`; in a git checkout, `git checkout -- mocoretrieval/weights`)"
        )
    encoder = _load_directory(folder, overrides)
    encoder.source = alias
    return encoder


def _load_directory(path: Path, overrides: dict[str, Any]) -> MoCoEncoder:
    config_file, weights_file = path / hub.CONFIG_NAME, path / hub.WEIGHTS_NAME
    missing = [f.name for f in (config_file, weights_file) if not f.is_file()]
    if missing:
        raise SourceError(
            f"{path} is not a saved encoder: it lacks {', '.join(missing)}. "
            f"Write one with MoCoEncoder.save_pretrained or `mocoretrieval convert`.\n{ACCEPTED}"
        )
    return _from_files(config_file, weights_file, overrides, origin=str(path))


def _load_hub(repo_id: str, overrides: dict[str, Any], hub_kwargs: dict[str, Any]) -> MoCoEncoder:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        config_file, weights_file = hub.download(repo_id, **hub_kwargs)
    except LocalEntryNotFoundError as e:
        raise SourceError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub and it is not in the local cache "
            f"(offline, or HF_HUB_OFFLINE=1). Download it once while online "
            f"(`huggingface-cli download {repo_id}`), or pass the path of a local copy."
        ) from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise SourceError(
            f"{repo_id!r} is not a mocoretrieval encoder on the Hub (no such repo, or no "
            f"config.json/model.safetensors in it).\n{ACCEPTED}"
        ) from e
    return _from_files(config_file, weights_file, overrides, origin=repo_id)


def _from_files(config_file: Path, weights_file: Path, overrides: dict[str, Any], origin: str):
    config, state = hub.read(config_file, weights_file)
    config.update(overrides)
    try:
        encoder = encoder_with_weights(config, state, origin)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file} does not describe a valid encoder: {e}") from e
    if encoder.source is None:
        encoder.source = origin
    return encoder


def encoder_with_weights(
    config: Mapping[str, Any], state: dict[str, torch.Tensor], origin: str
) -> MoCoEncoder:
    """The encoder ``config`` describes, holding the tensors of ``state`` (strictly checked).

    Built on the meta device first: a random initialisation that every tensor of ``state``
    replaces would cost ~0.5 s for a ResNet-50, on every command that loads a model.

    Raises:
        TypeError, ValueError: ``config`` is not a valid encoder configuration.
        CheckpointError: ``state`` does not fit it.
    """
    with torch.device("meta"):
        encoder = MoCoEncoder.from_config(config)
    load_state_dict_strict(encoder, state, origin, assign=True)
    return encoder


def load_state_dict_strict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str, assign: bool = False
) -> None:
    """Loads ``state`` into ``model``, raising on any missing, unexpected or mis-shaped tensor.

    With ``assign``, the module takes the tensors themselves (converted to its dtypes), as a
    model built on the meta device needs.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = ", ..." if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label} tensors ({', '.join(keys[:5])}{more})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {k}: "
                f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)"
            )
        raise CheckpointError(
            f"the weights from {origin} do not fit the {getattr(model, 'arch', 'model')} encoder: "
            + "; ".join(parts)
            + ". The file is incomplete or was made for another architecture."
        )
    if not assign:
        model.load_state_dict(state, strict=True)
        return
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [
        n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta
    ]
    if left:  # a tensor outside the state dict (a non-persistent buffer) has no values
        raise CheckpointError(f"{origin}: no values for {', '.join(left[:5])}")


# --- official facebookresearch checkpoints -------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a ``torch.save`` file without running any code from it (``weights_only=True``)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused to load {path}: its pickle holds code or objects beyond tensors and plain "
            "containers, which would run on load. Only load files from people you trust; convert "
            "a trusted one in an isolated environment with `mocoretrieval convert`."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({e}); the file may be truncated: "
            "download it again"
        ) from e


def load_official_checkpoint(path: str | Path, **overrides: Any) -> MoCoEncoder:
    """Converts an official MoCo v1/v2/v3 ``.pth.tar`` into a `MoCoEncoder` (query encoder only)."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors; expected an official MoCo checkpoint "
            "({'state_dict': {...}}).\n" + ACCEPTED
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config, weights = convert_state_dict(state, str(path))
    config["source"] = str(path)
    config.update(overrides)
    return encoder_with_weights(config, weights, str(path))


def convert_state_dict(state: dict[str, torch.Tensor], origin: str) -> tuple[dict, dict]:
    """Maps official key names (``module.`` already stripped) onto `MoCoEncoder`'s.

    Returns:
        (encoder config, encoder state dict).
    """
    if any(k.startswith("encoder_q.") for k in state):  # MoCo v1 / v2
        prefix, head_name = "encoder_q.", "fc"
        version = "v2" if f"{prefix}fc.0.weight" in state else "v1"
    elif any(k.startswith("base_encoder.") for k in state):  # MoCo v3
        prefix, version = "base_encoder.", "v3"
        head_name = "head" if f"{prefix}cls_token" in state else "fc"
    else:
        raise CheckpointError(
            f"{origin} is not an official MoCo checkpoint: no 'encoder_q.*' (v1/v2) or "
            "'base_encoder.*' (v3) tensors.\n" + ACCEPTED
        )
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    head = {k[len(head_name) + 1 :]: v for k, v in own.items() if k.startswith(head_name + ".")}
    body = {k: v for k, v in own.items() if not k.startswith(head_name + ".")}
    arch = _detect_arch(body, origin)
    config: dict[str, Any] = {"arch": arch, "moco_version": version, "head": _detect_head(head)}
    if arch.startswith("vit"):
        config["input_size"] = 224
    elif body["conv1.weight"].shape[-1] == 3:
        config.update(small_stem=True)
    weights = {f"backbone.net.{k}": v for k, v in body.items()}
    weights.update({f"head.{k}": v for k, v in head.items()})
    return config, weights


def _detect_arch(body: dict[str, torch.Tensor], origin: str) -> str:
    if "cls_token" in body:
        dim = body["cls_token"].shape[-1]
        for arch, d in (("vit_small", 384), ("vit_base", 768)):
            if dim == d:
                return arch
        raise CheckpointError(
            f"{origin}: ViT of width {dim} is not supported (ViT-S 384, ViT-B 768)"
        )
    if "conv1.weight" not in body:
        raise CheckpointError(f"{origin}: cannot tell the architecture (no conv1 or cls_token)")
    if "layer1.0.conv3.weight" in body:
        return "resnet50"
    blocks = len({k.split(".")[1] for k in body if k.startswith("layer3.")})
    return {1: "resnet10", 6: "resnet34"}.get(blocks, "resnet18")


def _detect_head(head: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if not head:
        return None
    if "weight" in head:  # v1: one Linear
        out_dim = head["weight"].shape[0]
        return {"num_layers": 1, "hidden_dim": out_dim, "out_dim": out_dim, "bias": "bias" in head}
    linears = sorted(
        (int(k.split(".")[0]) for k, v in head.items() if k.endswith("weight") and v.dim() == 2)
    )
    first, last = head[f"{linears[0]}.weight"], head[f"{linears[-1]}.weight"]
    batch_norm = any(k.endswith("running_mean") for k in head)
    last_index = max(int(k.split(".")[0]) for k in head)
    return {
        "num_layers": len(linears),
        "hidden_dim": int(first.shape[0]) if len(linears) > 1 else int(last.shape[0]),
        "out_dim": int(last.shape[0]),
        "batch_norm": batch_norm,
        "last_bn": last_index > linears[-1],
        "bias": f"{linears[0]}.bias" in head,
    }


def _download_official(alias: str) -> Path:
    url = OFFICIAL[alias]
    target = Path(torch.hub.get_dir()) / "checkpoints" / "mocoretrieval" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    how = (
        f"Download {url} by hand and pass its path instead of {alias!r} (or place it at {target})."
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "MOCORETRIEVAL_OFFLINE"
    ):
        raise SourceError(
            f"{alias!r} is not in the local cache and downloads are off (offline). {how}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as e:  # urllib raises several types for DNS, TLS, HTTP failures
        raise SourceError(f"cannot download {alias!r} from {url} ({e}). {how}") from e
    return target


def convert(source: str | Path, out_dir: str | Path, **overrides: Any) -> MoCoEncoder:
    """Loads any accepted source and writes it with ``save_pretrained`` (ready for the Hub)."""
    encoder = load(source, **overrides)
    encoder.save_pretrained(out_dir)
    return encoder


def _load_for_encoder(source: str | Path, **kwargs: Any) -> MoCoEncoder:
    return load(source, **kwargs)  # looked up per call: `sources.load` stays the one entry point


# `MoCoEncoder.from_pretrained` resolves its source here; encoder.py does not import this module.
MoCoEncoder._load_source = staticmethod(_load_for_encoder)
