"""Training data: unlabeled image folders, labeled validation folders, Fashion-MNIST (IDX).

The Fashion-MNIST reader lives in :mod:`mocoretrieval.datasets` (evaluation reads it too) and is
re-exported here.

Image folders are decoded by data-loader workers into two PIL-augmented views; Fashion-MNIST
is held in memory as one uint8 tensor and augmented batch-wise on the training device. The
data order comes from :class:`EpochSampler`, a pure function of (seed, epoch), so a resumed
run reads the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mocoretrieval.data import load_image
from mocoretrieval.datasets import (  # noqa: F401 (re-exported: training reads them from here)
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist,
    read_idx,
)
from mocoretrieval.errors import DatasetError, ImageError
from mocoretrieval.walk import IMAGE_EXTENSIONS, walk_images

logger = logging.getLogger(__name__)

# Training and evaluation share one bad-data error, raised by the readers they share.
TrainingDataError = DatasetError


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
        indexed: items are ``(index of the file used, transformed image)``; a file that fails
            to decode is replaced by the next one, and this says which.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], object],
        labeled: bool = False,
        min_side: int | None = None,
        indexed: bool = False,
    ) -> None:
        self.root = Path(root)
        self.indexed = indexed
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
            if self.indexed:
                return j, out
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
