"""Training data: unlabeled image folders, labeled validation folders, Fashion-MNIST (IDX).

Image folders are decoded by data-loader workers into two PIL-augmented views; Fashion-MNIST
is held in memory as one uint8 tensor and augmented batch-wise on the training device. The
data order comes from :class:`EpochSampler`, a pure function of (seed, epoch), so a resumed
run reads the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import gzip
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mocoretrieval.data import IMAGE_EXTENSIONS, load_image, walk_images
from mocoretrieval.errors import ImageError, MoCoRetrievalError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)  # measured on the 60k training images
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class TrainingDataError(MoCoRetrievalError):
    """Training data is missing, empty or unreadable."""


# --- Fashion-MNIST --------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), gzip'd or not, into a read-only array."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _read_idx_cached(path, stat.st_mtime_ns if stat else 0)


@functools.lru_cache(maxsize=4)  # a run reads the training images twice (train, kNN bank)
def _read_idx_cached(path: Path, mtime_ns: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise TrainingDataError(f"cannot read {path} ({e}); reinstall the dataset") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise TrainingDataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise TrainingDataError(f"{path} is truncated; reinstall the dataset")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    arr.flags.writeable = False
    return arr


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise TrainingDataError(
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


# --- image folders --------------------------------------------------------------------------


class RobustImageDataset(Dataset):
    """Images under a folder; a file that fails to decode is skipped for the next one.

    Files are found and decoded as indexing does (:func:`mocoretrieval.data.walk_images`,
    :func:`mocoretrieval.data.load_image`: EXIF orientation, any colour mode, JPEG draft).

    Args:
        root: the folder (walked recursively, hidden files skipped).
        transform: PIL image -> anything (e.g. a pair of augmented views).
        labeled: label each image by its first-level sub-folder (for kNN validation).
        min_side: JPEGs are decoded at reduced size while their short side stays above this.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], object],
        labeled: bool = False,
        min_side: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise TrainingDataError(f"{self.root} is not a folder; pass the folder of images")
        self.files = walk_images(self.root)
        if not self.files:
            raise TrainingDataError(
                f"no images under {self.root} (looked for {sorted(IMAGE_EXTENSIONS)})"
            )
        self.transform, self.min_side = transform, min_side
        self.classes: list[str] = []
        self.labels: list[int] = []
        if labeled:
            self.classes = sorted({f.split("/")[0] for f in self.files if "/" in f})
            if len(self.classes) < 2:
                raise TrainingDataError(
                    f"{self.root} needs one sub-folder per class (at least two) for kNN validation"
                )
            index = {c: i for i, c in enumerate(self.classes)}
            self.files = [f for f in self.files if "/" in f]
            self.labels = [index[f.split("/")[0]] for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        for attempt in range(min(len(self.files), 16)):
            j = (i + attempt) % len(self.files)
            try:  # the decoder of indexing: training and indexing skip the same files
                img = load_image(self.root / self.files[j], self.min_side)
            except ImageError as e:
                logger.warning("skipping %s", e)
                continue
            out = self.transform(img)
            return (out, self.labels[j]) if self.labels else out
        raise TrainingDataError(f"16 images in a row under {self.root} failed to decode")


class TwoViews:
    """Applies two transforms to one image: the query and key views."""

    def __init__(self, t1: Callable, t2: Callable) -> None:
        self.t1, self.t2 = t1, t2

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t1(img), self.t2(img)


# --- data order -----------------------------------------------------------------------------


class EpochSampler:
    """Each process's batches of an epoch: a permutation seeded by (seed, epoch), dealt to
    ``world_size`` processes in equal shares, the last incomplete global batch dropped.

    Being a pure function of its state, it resumes exactly (``state_dict``/``load_state_dict``).
    """

    def __init__(
        self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} does not divide among {world_size} processes"
            )
        if n < batch_size:
            raise TrainingDataError(f"{n} training images are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: len(self) * self.batch_size]
        per = self.batch_size // self.world_size
        glob = order.view(len(self), self.world_size, per)
        return glob[:, self.rank].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["batch_size"] != self.batch_size:
            raise TrainingDataError(
                f"the checkpoint was trained on {state['n']} images in batches of "
                f"{state['batch_size']}, this run has {self.n} in batches of {self.batch_size}; "
                "resume with the same data and batch size"
            )
        self.seed, self.epoch = state["seed"], state["epoch"]
