"""What a run reads: the stream of augmented view pairs and the labeled kNN sets, per source.

``fashion-mnist`` is held in memory (on the training device) and augmented batch-wise there;
an image folder is decoded and augmented by data-loader worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mocoretrieval.encoder import IMAGENET_MEAN, IMAGENET_STD

from .augment import BatchAugment, eval_batch, pil_view_transform
from .config import PretrainConfig
from .data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    EpochSampler,
    RobustImageDataset,
    TwoViews,
    fashion_mnist,
)
from .heads import eval_resize

Pairs = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DataOptions:
    """Where the data comes from (not part of the recipe, so not in :class:`PretrainConfig`)."""

    data: str = "fashion-mnist"  # "fashion-mnist" or a folder of unlabeled images
    data_root: str = str(FASHION_MNIST_DIR)  # folder of the Fashion-MNIST IDX files
    val_dir: str | None = None  # labeled folder (one sub-folder per class) for the kNN monitor
    limit_train: int | None = None  # use the first N training images only
    knn_bank: int | None = None  # Fashion-MNIST: first N training images as the kNN bank
    knn_val: int | None = None  # Fashion-MNIST: first N test images as kNN queries
    workers: int = 8  # data-loader processes for image folders

    @property
    def is_fashion_mnist(self) -> bool:
        return self.data == "fashion-mnist"


def normalization(cfg: PretrainConfig, opts: DataOptions) -> tuple[tuple, tuple]:
    """(mean, std): the config's, else the dataset's, else ImageNet's."""
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    if opts.is_fashion_mnist:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


class TensorPairs:
    """View pairs of an in-memory uint8 image tensor, augmented on its device."""

    def __init__(self, images: torch.Tensor, cfg: PretrainConfig, mean, std) -> None:
        self.images = images
        self.aug = (BatchAugment(cfg, 0, mean, std), BatchAugment(cfg, 1, mean, std))

    def __len__(self) -> int:
        return self.images.shape[0]

    def epoch(self, sampler: EpochSampler, device: torch.device) -> Pairs:
        # The epoch's indices go to the device in one copy: a copy per step from host memory
        # would make every step wait for the GPU to drain its queue.
        order = torch.tensor(sampler.batches(), device=self.images.device)  # (steps, B)
        for idx in order:
            x = self.images[idx]
            yield self.aug[0](x), self.aug[1](x)


class FolderPairs:
    """View pairs of an image folder, decoded and augmented by ``workers`` processes."""

    def __init__(self, root: str, cfg: PretrainConfig, mean, std, workers: int) -> None:
        views = TwoViews(
            pil_view_transform(cfg, 0, mean, std), pil_view_transform(cfg, 1, mean, std)
        )
        # JPEG draft decoding may shrink an image only as far as keeps the smallest crop
        # (crop_min of the area) at the input resolution, so that crops are not upsampled.
        min_side = math.ceil(cfg.input_size / math.sqrt(cfg.crop_min))
        self.dataset = RobustImageDataset(root, views, min_side=min_side)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.dataset)

    def epoch(self, sampler: EpochSampler, device: torch.device) -> Pairs:
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler.batches(),
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
        )
        for x1, x2 in loader:
            yield x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)


@dataclass
class KnnSets:
    """Preprocessed batches of the kNN bank and queries; no bank means leave-one-out."""

    queries: list[torch.Tensor]
    query_labels: torch.Tensor
    bank: list[torch.Tensor] | None = None
    bank_labels: torch.Tensor | None = None
    name: str = ""
    # The images as stored (before resizing and normalising), for the raw-pixel floor.
    raw_queries: list[torch.Tensor] | None = None
    raw_bank: list[torch.Tensor] | None = None


def _chunks(images: torch.Tensor, resize: int, crop: int, mean, std, bs: int = 512):
    return [
        eval_batch(images[i : i + bs], resize, crop, mean, std)
        for i in range(0, images.shape[0], bs)
    ]


def build_train(cfg: PretrainConfig, opts: DataOptions, device: torch.device):
    """The training pairs source and a description of the data for the model card."""
    mean, std = normalization(cfg, opts)
    if opts.is_fashion_mnist:
        images, _ = fashion_mnist("train", opts.data_root, opts.limit_train)
        source = TensorPairs(images.to(device), cfg, mean, std)
        return source, {"dataset": "fashion-mnist", "split": "train", "images": len(source)}
    source = FolderPairs(opts.data, cfg, mean, std, opts.workers)
    if opts.limit_train:
        source.dataset.files = source.dataset.files[: opts.limit_train]
    return source, {"dataset": Path(opts.data).name, "images": len(source)}


def build_knn(cfg: PretrainConfig, opts: DataOptions, device: torch.device) -> KnnSets | None:
    """The labeled sets of the kNN monitor: Fashion-MNIST train->test, or a val folder."""
    mean, std = normalization(cfg, opts)
    resize, crop = eval_resize(cfg.input_size, cfg.small_stem), cfg.input_size
    if opts.is_fashion_mnist:
        bank, bank_labels = fashion_mnist("train", opts.data_root, opts.knn_bank)
        queries, labels = fashion_mnist("test", opts.data_root, opts.knn_val)
        return KnnSets(
            queries=_chunks(queries.to(device), resize, crop, mean, std),
            query_labels=labels.to(device),
            bank=_chunks(bank.to(device), resize, crop, mean, std),
            bank_labels=bank_labels.to(device),
            name=f"fashion-mnist test ({len(labels)}) vs train ({len(bank_labels)})",
            raw_queries=[(queries.float() / 255).to(device)],
            raw_bank=[(bank.float() / 255).to(device)],
        )
    if not opts.val_dir:
        return None
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])
    ds = RobustImageDataset(opts.val_dir, tf, labeled=True, min_side=resize)
    # Decoded by worker processes, as the training images are, not one by one on rank 0.
    loader = DataLoader(ds, batch_size=256, num_workers=min(opts.workers, len(ds)))
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.to(device))
        ys.append(y)
    return KnnSets(
        queries=xs,
        query_labels=torch.cat(ys).to(device),
        name=f"{Path(opts.val_dir).name} leave-one-out ({len(ds)}, {len(ds.classes)} classes)",
    )
