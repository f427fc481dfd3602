"""The saved-encoder layout (config.json, model.safetensors, README.md): written, read, fetched.

Like timm's ``_hub.py``, this is the one module that does file and Hub I/O for an encoder and
holds its model card; ``encoder.py`` keeps the architecture and calls in here from the Hub
mixin's ``_save_pretrained`` hook, and ``sources.py`` decides which source a string names and
builds the encoder from what is read here. It imports no model code (``encoder.py`` imports it,
lazily), so the layout is written and read without knowing the class that holds the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .embedder import EncoderConfig
from .errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"

MODEL_CARD = """---
library_name: mocoretrieval
tags:
- moco
- self-supervised
- image-feature-extraction
---
# {title}

A MoCo {version} `{arch}` image encoder for [mocoretrieval](https://github.com/mocoretrieval).

- Paper: {paper}
- Source: {source}
- Embedding: `{embedding}` ({dim}-d, L2-normalised)
- Preprocessing: resize short side to {resize_size}, centre crop {input_size},
  mean {mean}, std {std}

```python
from mocoretrieval import MoCoEncoder
encoder = MoCoEncoder.from_pretrained("PATH_OR_REPO_ID")
vectors = encoder.embed([image])  # (N, {dim}) float32, L2-normalised
```
{extra}"""


def model_card(config: EncoderConfig) -> str:
    """The README.md of a saved encoder: what it is, where from, how to load it; ``extra``
    (training record, measured accuracy) as JSON under "Training"."""
    extra = ""
    if config.extra:
        extra = "\n## Training\n\n```json\n" + json.dumps(config.extra, indent=2) + "\n```\n"
    return MODEL_CARD.format(
        title=f"MoCo {config.moco_version} {config.arch}",
        version=config.moco_version,
        arch=config.arch,
        paper=config.paper,
        source=config.source or "unknown",
        embedding=config.embedding,
        dim=config.dim,
        resize_size=config.resize_size,
        input_size=config.input_size,
        mean=list(config.mean),
        std=list(config.std),
        extra=extra,
    )


def save(model: torch.nn.Module, config: EncoderConfig, directory: str | Path) -> None:
    """Writes ``model``'s tensors, ``config`` and its model card into ``directory``.

    Called by ``MoCoEncoder._save_pretrained``, the Hub mixin's hook: the mixin writes
    config.json and README.md only when the hook has not, so both are written here, from the
    encoder's config as it is now (``source`` or ``extra`` set after construction included) and
    every time (a re-save refreshes the card). config.json is formatted as the mixin formats it.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), sort_keys=True, indent=2))
    (directory / CARD_NAME).write_text(model_card(config))


def download(repo_id: str, **hub_kwargs: Any) -> tuple[Path, Path]:
    """Fetches (or finds in the local cache) a Hub repo's config.json and model.safetensors.

    Args:
        hub_kwargs: ``revision``, ``cache_dir``, ``token`` for ``hf_hub_download``.

    Returns:
        (config file, weights file), local paths.

    Raises:
        huggingface_hub's errors, which ``sources.load`` turns into the fix for the user.
    """
    from huggingface_hub import hf_hub_download

    config_file = hf_hub_download(repo_id, CONFIG_NAME, **hub_kwargs)
    weights_file = hf_hub_download(repo_id, WEIGHTS_NAME, **hub_kwargs)
    return Path(config_file), Path(weights_file)


def read(config_file: Path, weights_file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config object and the tensors of a saved encoder (nothing is checked against them).

    Raises:
        CheckpointError: either file is damaged.
    """
    from safetensors.torch import load_file

    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); re-save the encoder") from e
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(
            f"{weights_file} is damaged or not a safetensors file ({e}); download or save it again"
        ) from e
    return config, state
