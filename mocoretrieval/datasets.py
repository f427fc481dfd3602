"""Standard datasets read from their distribution files: Fashion-MNIST from IDX files.

Shared by training (pretraining data, kNN monitor) and evaluation (``mocoretrieval eval knn
--dataset fashion-mnist``); nothing is exported to image files.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)  # measured on the 60k training images
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
# Xiao et al. 2017, Table 1: the label of each class index.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --- Fashion-MNIST --------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), gzip'd or not, into a read-only array."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _read_idx_cached(path, stat.st_mtime_ns if stat else 0)


@functools.lru_cache(maxsize=4)  # training reads its images twice (train, kNN bank)
def _read_idx_cached(path: Path, mtime_ns: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path} ({e}); reinstall the dataset") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise DatasetError(f"{path} is truncated; reinstall the dataset")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    arr.flags.writeable = False
    return arr


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with "
        "`apt-get install dataset-fashion-mnist` or pass --data-root to its folder"
    )


def fashion_mnist(
    split: str = "train", root: str | Path = FASHION_MNIST_DIR, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (Xiao et al. 2017) from its IDX files.

    Args:
        split: ``train`` (60,000 images) or ``test`` (10,000).
        root: the folder with the four IDX files.
        limit: keep the first ``limit`` images only.

    Returns:
        (images, labels): uint8 (N, 1, 28, 28) and int64 (N,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
