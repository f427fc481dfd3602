"""Static int8 quantization of an exported encoder, calibrated on a sample of the user's images."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import BackendError, ImageError
from .onnx_export import INPUT_NAME, read_metadata, sidecar_path, write_metadata
from .preprocess import Preprocess, check_preprocessing

logger = logging.getLogger(__name__)

# Activation ranges from min/max over a few dozen natural images are stable enough for
# retrieval; recall@10 against fp32 is measured in benchmarks/onnx_vs_torch.py.
CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 16
# Only the ops that hold the FLOPs run in int8: every other quantized op only adds Q/DQ pairs
# (and LayerNormalization has no int8 kernel). On ViT-S this made int8 faster instead of slower.
INT8_OPS = ("Conv", "MatMul", "Gemm")


def sample_evenly(items: list[Any], k: int) -> list[Any]:
    """``k`` items spread evenly over ``items`` (folders are walked in order: spans them all)."""
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def calibration_batches(
    preprocess: Callable[[Image.Image], torch.Tensor],
    images: Iterable[str | Path | Image.Image],
    max_images: int = CALIBRATION_IMAGES,
    batch_size: int = CALIBRATION_BATCH,
    min_side: int | None = None,
) -> list[np.ndarray]:
    """Preprocessed (B, 3, S, S) float32 batches of up to ``max_images`` images.

    Files are decoded as indexing decodes them (:func:`~mocoretrieval.data.load_image`, with
    ``min_side``), so calibration sees the pixels the model will see; unreadable ones are
    skipped with a warning.
    """
    from .data import load_image

    tensors = []
    for item in sample_evenly(list(images), max_images):
        try:
            image = item if isinstance(item, Image.Image) else load_image(item, min_side=min_side)
            tensors.append(preprocess(image.convert("RGB")))
        except (ImageError, OSError, ValueError) as e:
            logger.warning("calibration: skipping %s: %s", item, e)
    if not tensors:
        raise BackendError("no readable image to calibrate int8 on; pass a folder with images")
    return [
        torch.stack(tensors[i : i + batch_size]).numpy() for i in range(0, len(tensors), batch_size)
    ]


def _reader(batches: list[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageCalibrationReader(CalibrationDataReader):
        """Feeds the calibration batches to onnxruntime's calibrator, once each."""

        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = iter(batches)

    return ImageCalibrationReader()


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    images: Iterable[str | Path | Image.Image],
    max_images: int = CALIBRATION_IMAGES,
    quant_format: str = "qdq",
) -> Path:
    """Writes a statically quantized int8 copy of an exported fp32 model.

    Weights are int8 per output channel and activations uint8 per tensor with min/max ranges
    (the recipe of Krishnamoorthi, "Quantizing deep convolutional networks for efficient
    inference: A whitepaper", arXiv:1806.08342, which finds per-channel weights keep
    post-training accuracy close to float). onnxruntime fuses the QDQ pairs into integer
    kernels (VNNI where the CPU has it).

    Args:
        fp32_path: a model written by :func:`~mocoretrieval.onnx_backend.export_onnx`.
        out_path: the int8 ``.onnx`` file to write; metadata and sidecar are carried over.
        images: paths or PIL images to calibrate on; ``max_images`` of them, spread evenly.
        max_images: how many images calibrate the activation ranges.
        quant_format: ``qdq`` (QuantizeLinear/DequantizeLinear pairs) or ``qoperator``
            (QLinearConv and friends).

    Returns:
        The path written.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise BackendError(f"unknown quant_format {quant_format!r}; choose qdq or qoperator")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    meta = read_metadata(fp32_path)
    if meta.get("quantize"):
        raise BackendError(f"{fp32_path} is already quantized ({meta['quantize']})")
    # Preprocessing straight from the file's config, as OnnxEncoder builds it: this module sits
    # below onnx_backend (whose cache calls it) and does not import it.
    c = meta["config"]
    check_preprocessing(
        c.get("resize_size"), c.get("input_size"), c.get("mean"), c.get("std"), where=str(fp32_path)
    )
    preprocess = Preprocess(c["resize_size"], c["input_size"], c["mean"], c["std"])
    batches = calibration_batches(preprocess, images, max_images, min_side=preprocess.resize_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX shape inference and graph clean-up first, as onnxruntime's quantization guide asks;
        # its symbolic shape inference trips over the Expand of the L2 normalisation.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre),
            str(staged),
            _reader(batches, meta.get("input_name", INPUT_NAME)),
            quant_format=formats[quant_format],
            op_types_to_quantize=list(INT8_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        meta.update(quantize="int8", calibration_images=sum(len(b) for b in batches))
        write_metadata(staged, meta)
        os.replace(staged, out_path)
        os.replace(sidecar_path(staged), sidecar_path(out_path))
    logger.info(
        "wrote int8 model %s (calibrated on %d images)", out_path, meta["calibration_images"]
    )
    return out_path
