"""ONNX export of a `MoCoEncoder`: one self-contained file, its metadata and its sidecar JSON."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .encoder import MoCoEncoder
from .errors import BackendError

logger = logging.getLogger(__name__)


# Bumped whenever the exported graph or its metadata change meaning; part of the cache key, and
# a file written by a newer mocoretrieval is refused.
FORMAT_VERSION = 1
META_PREFIX = "mocoretrieval."
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
# ONNX files hold at most 2 GiB in one protobuf; every supported backbone (ViT-B: ~350 MB) fits.
_SINGLE_FILE_LIMIT = 2**31 - 2**26


def sidecar_path(path: str | Path) -> Path:
    """The JSON file next to ``model.onnx`` that repeats its metadata: ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class _Normalized(nn.Module):
    """The encoder with the L2 normalisation inside the graph: the file alone gives embeddings."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.encoder(x).float(), dim=1)  # (N, D)


def _metadata(encoder: MoCoEncoder, opset: int, quantize: str | None) -> dict[str, Any]:
    return {
        "format": "mocoretrieval-onnx",
        "format_version": FORMAT_VERSION,
        "config": encoder.config.to_dict(),
        "weights_hash": encoder.weights_hash(),
        "dim": encoder.dim,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "opset": opset,
        "quantize": quantize,
        "torch_version": torch.__version__,
    }


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's content, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Writes ``meta`` into the model's metadata_props and into its sidecar JSON."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    _set_props(model, meta)
    _write_sidecar(path, meta, _save_single_file(model, path))


def _set_props(model: Any, meta: dict[str, Any]) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = META_PREFIX + key, json.dumps(value)


def _save_single_file(model: Any, path: Path) -> str:
    """Saves ``model`` atomically; returns the SHA-256 of what was written."""
    import onnx

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    digest = file_sha256(tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return digest


def _write_sidecar(path: Path, meta: dict[str, Any], digest: str) -> None:
    """The sidecar repeats the metadata and records the model file's hash, which is how a
    cached export proves its content (see ``onnx_backend.cached_onnx``), not only its label."""
    side = sidecar_path(path)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**meta, "file_sha256": digest}, indent=2) + "\n")
    os.replace(tmp, side)


def export_onnx(encoder: MoCoEncoder, path: str | Path, opset: int = 18) -> Path:
    """Exports ``encoder`` to one self-contained ONNX file with a dynamic batch axis.

    The graph maps ``images`` (N, 3, S, S), preprocessed as ``encoder.preprocess`` does, to
    L2-normalised ``embeddings`` (N, D). The encoder's config (sizes, mean, std, ...) and weights
    hash go into the model's metadata_props and into ``<path>.json``, so that
    :meth:`OnnxEncoder.from_file` needs nothing else.

    Uses the ``torch.export``-based exporter (the default since torch 2.9; the TorchScript one
    is deprecated); it handles the ResNets and timm ViTs, and all weights stay inside the file.

    Args:
        encoder: the encoder to export; not modified.
        path: the ``.onnx`` file to write; its directory is created.
        opset: ONNX opset, at least 17 (LayerNormalization, which the ViTs need).

    Returns:
        The path written.
    """
    if opset < 17:
        raise BackendError(f"opset must be >= 17 (LayerNormalization for ViTs), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * 4 for p in encoder.state_dict().values())
    if n_bytes > _SINGLE_FILE_LIMIT:
        raise BackendError(
            f"{encoder.arch} has {n_bytes / 2**30:.1f} GiB of weights, more than one ONNX file holds"
        )
    meta = _metadata(encoder, opset, None)
    model = encoder
    param = next(encoder.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        import copy

        model = copy.deepcopy(encoder).to("cpu", torch.float32)
    was_training = model.training
    model.eval()
    size = encoder.input_size
    # A batch of 2: torch.export specialises dimensions of size 0 and 1 to constants.
    example = torch.randn(2, 3, size, size)
    try:
        program = torch.onnx.export(
            _Normalized(model).eval(),
            (example,),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    except Exception as e:  # the exporter raises many types; say which model failed and why
        raise BackendError(f"ONNX export of {encoder.arch} failed: {e}") from e
    finally:
        model.train(was_training)
    for key, value in meta.items():
        program.model.metadata_props[META_PREFIX + key] = json.dumps(value)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    program.save(tmp, external_data=False)
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    _write_sidecar(path, meta, digest)
    logger.info("exported %s to %s", encoder.arch, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported model: from its metadata_props, else from its sidecar JSON."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise BackendError(f"no ONNX model at {path}; write one with `mocoretrieval export-onnx`")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    props = _session(path, opts).get_modelmeta().custom_metadata_map
    return _parse_metadata(path, props)


def _parse_metadata(path: Path, props: dict[str, str]) -> dict[str, Any]:
    meta = {
        k[len(META_PREFIX) :]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)
    }
    if "config" not in meta:
        side = sidecar_path(path)
        if not side.is_file():
            raise BackendError(
                f"{path} carries no mocoretrieval metadata and has no sidecar {side.name}; "
                "export it with `mocoretrieval export-onnx SOURCE OUT.onnx`"
            )
        meta = json.loads(side.read_text())
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BackendError(
            f"{path} was exported by a newer mocoretrieval (format {meta['format_version']}); "
            "upgrade with `pip install -U mocoretrieval`"
        )
    return meta


def _session(path: Path, opts: Any, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
        raise BackendError(
            f"onnxruntime cannot load {path}: {e}. Delete it and export again"
        ) from e
