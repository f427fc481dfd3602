"""`OnnxEncoder`: an exported encoder run by onnxruntime, an :class:`~.embedder.Embedder`.

Which backend embeds, and the export cache it reads from, are chosen in
:mod:`mocoretrieval.models` and :mod:`mocoretrieval.onnx_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .embed import available_cpus
from .embedder import FIELDS, EncoderConfig, EncoderConfigMixin
from .errors import BackendError
from .onnx_export import _parse_metadata, _session
from .preprocess import Preprocess, check_preprocessing

__all__ = ["OnnxEncoder"]


class OnnxEncoder(EncoderConfigMixin):
    """An exported encoder run by onnxruntime, with :class:`MoCoEncoder`'s embedding protocol.

    ``preprocess``, ``input_size``, ``dim``, ``config`` and ``weights_hash()`` are those of the
    source encoder, so an index built with either backend is searchable with the other.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx` (or quantized from one).
        threads: onnxruntime intra-op threads; default, every core this process may use.
        device: ``cpu``, or ``cuda`` when onnxruntime was built with the CUDA provider.
        config: replaces the file's encoder config, e.g. with the ``source`` the weights were
            just loaded from when a cached export (keyed by weights, not source) is reused.
    """

    backend = "onnx"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        device: str = "cpu",
        config: EncoderConfig | Mapping[str, Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"no ONNX model at {self.path}; write one with `export-onnx`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or available_cpus()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: the image decoders share these cores. Indexing
        # 40 4-MPix JPEGs with ResNet-50 on 2 cores: 1.4-1.5x the images/s and 0.75-0.9x the CPU.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "this onnxruntime has no CUDA provider; use --backend torch on a GPU "
                    "(or install onnxruntime-gpu)"
                )
            providers.insert(0, "CUDAExecutionProvider")
        self.session = _session(self.path, opts, providers)
        self.meta = _parse_metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        c = config if config is not None else self.meta["config"]
        where = f"the config in {self.path}"
        self._config = c if isinstance(c, EncoderConfig) else EncoderConfig.from_dict(c)
        c = self._config
        check_preprocessing(c.resize_size, c.input_size, c.mean, c.std, where=where)
        if "dim" in self.meta and int(self.meta["dim"]) != self.dim:
            raise BackendError(
                f"{self.path} outputs {self.meta['dim']}-d embeddings but its config describes "
                f"{self.dim}-d ones: export it again with `mocoretrieval export-onnx`"
            )
        self.loaded_from: str | None = None  # the model source it was exported from, if known
        self.input_name = self.meta.get("input_name", self.session.get_inputs()[0].name)
        self.quantize: str | None = self.meta.get("quantize")

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> OnnxEncoder:
        """Loads an exported model; preprocessing is rebuilt from the file's own metadata."""
        return cls(path, threads=threads)

    @property
    def config(self) -> EncoderConfig:
        return self._config

    def __getattr__(self, name: str) -> Any:
        # The config's fields read as attributes, as MoCoEncoder has them (``arch``,
        # ``input_size``, ``mean``...): one rule for every field, no forwarding list.
        config = self.__dict__.get("_config")
        if config is not None and name in FIELDS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def preprocess(self) -> Preprocess:
        """The evaluation transform of the exported config, the same class MoCoEncoder uses."""
        c = self._config
        return Preprocess(c.resize_size, c.input_size, c.mean, c.std)

    def weights_hash(self) -> str:
        """The source encoder's weights hash, so indexes pin the same model whatever the backend."""
        return str(self.meta["weights_hash"])

    def to(self, device: Any) -> OnnxEncoder:
        """No-op, for code written for torch modules; the device is chosen at construction."""
        return self

    def eval(self) -> OnnxEncoder:
        return self

    def embed(
        self, images: Sequence[Image.Image] | Image.Image | torch.Tensor | np.ndarray
    ) -> np.ndarray:
        """Embeds PIL images (any mode) or a preprocessed (N, 3, H, W) batch.

        Returns:
            float32 array of shape (N, D), each row L2-normalised.
        """
        if isinstance(images, torch.Tensor):
            batch = images.detach().to("cpu", torch.float32).numpy()
        elif isinstance(images, np.ndarray):
            batch = images.astype(np.float32, copy=False)
        else:
            if isinstance(images, Image.Image):
                images = [images]
            batch = self.preprocess.batch(images).numpy()
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
        # Normalised again outside the graph: int8 models round the in-graph normalisation.
        out = out.astype(np.float32, copy=False)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def __repr__(self) -> str:
        q = f", quantize={self.quantize!r}" if self.quantize else ""
        return f"OnnxEncoder({self.config.arch}, dim={self.dim}, path={str(self.path)!r}{q})"
