"""Datasets -> batches on the training device.

Two ways in, one way out. Data that fits (CIFAR-10/100, image folders decoded once at
`image_size`) lives on the device as one uint8 NHWC tensor (`MemoryLoader`); bigger image folders
are decoded by DataLoader workers (`StreamLoader`). Either way each batch reaches the device as
uint8 and is augmented, resized and normalized there, per batch, from a generator seeded by
(seed, epoch): the same seed gives the same batches.

    sources.py     CIFAR and image folders on disk -> uint8 tensors or file lists; splits
    loaders.py     batches of a split, in a seeded order, sharded over processes
    transforms.py  the per-batch augmentation and normalization on the device
    policies.py    per-image AutoAugment / RandAugment / TrivialAugment, cutout, random erasing
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import DATASETS, stored_image_size
from ..errors import DataError
from .loaders import Loader, MemoryLoader, Shard, StreamLoader, epoch_generator
from .sources import (
    CIFAR,
    Split,
    channel_stats,
    decode_all,
    decode_resized,
    list_image_folder,
    load_cifar,
    stratified_split,
)
from .transforms import Augment, BatchTransform, crop_flip, draw_augmentation

__all__ = ["Augment", "Batching", "BatchTransform", "CIFAR", "Data", "DataError", "DatasetSpec", "Loader", "MemoryLoader",
           "Shard", "StreamLoader", "build_data", "channel_stats", "crop_flip", "decode_all", "decode_resized", "draw_augmentation",
           "epoch_generator", "list_image_folder", "load_cifar", "stratified_split"]

# --------------------------------------------------------------------------------------------
# Config values → loaders
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: Loader
    val: Loader | None
    test: Loader | None
    classes: list[str]
    mean: list[float] | None
    std: list[float] | None
    image_size: int  # what the model sees
    stored_size: int  # what images are decoded to (CIFAR: 32, then resized per batch to image_size)
    val_source: str  # where validation images come from, for the log
    storage: str  # "memory" or "stream"


def memory_budget_bytes(device: torch.device) -> int:
    """How much decoded data `loader=auto` keeps in memory: a third of the device's (or host's) memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 3
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3


def resolve_val_size(val_size: int | float, n_train: int) -> int:
    n = round(val_size * n_train) if isinstance(val_size, float) else int(val_size)
    if n >= n_train:
        raise DataError(f"dataset.val_size={val_size} leaves no training images (the training split has {n_train})")
    return n


@dataclass(frozen=True)
class DatasetSpec:
    """Which images, and how they are prepared: the `dataset` config group."""

    name: str  # one of config.DATASETS
    root: str
    image_size: int = 32  # what the model sees
    mean: Sequence[float] | None = None  # None (with normalize): computed from the training images
    std: Sequence[float] | None = None
    normalize: bool = True
    val_size: int | float = 0.1  # a count, a fraction of the training split, or 0 (validate on test)
    split_seed: int = 0
    download: bool = False
    loader: str = "memory"  # memory | stream | auto (memory when it fits)


@dataclass(frozen=True)
class Batching:
    """How splits become batches on the device."""

    batch_size: int  # the global training batch (split over a shard's processes)
    eval_batch_size: int
    augment: Augment | None = None  # training batches only
    seed: int = 0  # order and augmentation of each epoch
    num_workers: int = 0  # decoding processes
    channels_last: bool = True


def build_data(dataset: DatasetSpec, batching: Batching, device: torch.device, shard: Shard = Shard(),
               log=print) -> Data:
    """Read the dataset, split off validation images and wrap each split in a loader. With a
    `shard`, `batching.batch_size` is the global batch: each of the shard's processes gets an equal part."""
    root = Path(dataset.root).expanduser()
    stored_size = stored_image_size(dataset.name, dataset.image_size)
    if dataset.name in CIFAR:
        train, test, classes = load_cifar(dataset.name, root, dataset.download)
        val, storage = None, "memory"
    elif dataset.name == "image_folder":
        root = root.resolve()
        train, val, test, classes, storage = _read_image_folder(root, dataset, device, batching.num_workers, log)
    else:
        raise DataError(f"dataset.name={dataset.name!r} is not one of {', '.join(DATASETS)}")
    train, val, val_source = _validation_split(train, val, test, dataset.val_size, dataset.split_seed, root)
    if batching.batch_size > len(train):
        raise DataError(f"batch_size={batching.batch_size} is larger than the training split ({len(train):,} images)")
    mean, std = _normalization(dataset, train, batching.num_workers, log)

    def make(split: Split | None, train_mode: bool) -> Loader | None:
        if split is None:
            return None
        transform = BatchTransform(mean, std, batching.augment if train_mode else None,
                                   dataset.image_size if dataset.image_size != stored_size else None,
                                   batching.channels_last)
        per_process = (batching.batch_size if train_mode else batching.eval_batch_size) // shard.world_size or 1
        if storage == "memory":
            return MemoryLoader(split.images.to(device), split.labels.to(device), per_process, transform, train_mode,
                                batching.seed, shard)
        return StreamLoader(split.samples, dataset.image_size, per_process, transform, train_mode, device,
                            batching.seed, batching.num_workers, shard)

    test_loader = make(test, False)
    val_loader = test_loader if val is test else make(val, False)
    return Data(make(train, True), val_loader, test_loader, classes, mean, std, dataset.image_size, stored_size,
                val_source, storage)


def _normalization(dataset: DatasetSpec, train: Split, num_workers: int,
                   log) -> tuple[list[float] | None, list[float] | None]:
    """The mean and std batches are normalized with: given, computed from the training images, or none."""
    if not dataset.normalize:
        return None, None
    mean, std = dataset.mean, dataset.std
    if mean is None or std is None:
        computed = _channel_stats_of(train, dataset.image_size, dataset.split_seed, num_workers)
        mean, std = mean or computed[0], std or computed[1]
        log(f"Normalization computed from the training images: mean {_fmt(mean)}, std {_fmt(std)}")
    return list(mean), list(std)


def _read_image_folder(root: Path, dataset: DatasetSpec, device: torch.device, num_workers: int,
                       log) -> tuple[Split, Split | None, Split | None, list[str], str]:
    """root/train (and root/val, root/test where present) as splits, decoded into memory at
    image_size or left as file lists to stream (`dataset.loader`; auto: memory when it fits the budget)."""
    image_size, loader = dataset.image_size, dataset.loader
    samples, classes = list_image_folder(root / "train")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    to_split = lambda s: Split(torch.tensor([label for _, label in s]), samples=s)  # noqa: E731

    def optional_split(name: str) -> Split | None:
        folder = root / name
        return to_split(list_image_folder(folder, class_to_idx)[0]) if folder.is_dir() else None

    train, val, test = to_split(samples), optional_split("val"), optional_split("test")
    total = sum(len(s) for s in (train, val, test) if s is not None)
    storage = loader
    if loader == "auto":
        storage = "memory" if total * image_size ** 2 * 3 <= memory_budget_bytes(device) else "stream"
    if storage == "memory":
        log(f"Decoding {total:,} images from {root} at {image_size}x{image_size} into memory")
        decoded = lambda s: Split(s.labels, images=decode_all(s.samples, image_size, num_workers))  # noqa: E731
        train, val, test = (None if s is None else decoded(s) for s in (train, val, test))
    return train, val, test, classes, storage


def _validation_split(train: Split, val: Split | None, test: Split | None, val_size: int | float, split_seed: int,
                      root: Path) -> tuple[Split, Split | None, str]:
    """(train, val, where validation comes from): a val/ folder as it is; val_size=0 validates on the
    test split; otherwise val_size images held out from training, stratified by class."""
    if val is not None:
        return train, val, f"{root / 'val'} ({len(val):,} images)"
    if val_size == 0:
        return train, test, ("the test split (dataset.val_size=0: training on every training image)"
                             if test is not None else "none")
    n_val = resolve_val_size(val_size, len(train))
    train_idx, val_idx = stratified_split(train.labels, n_val, split_seed)
    source = f"{n_val:,} images held out from the training split (stratified, dataset.split_seed={split_seed})"
    return train.subset(train_idx), train.subset(val_idx), source


def _channel_stats_of(train: Split, image_size: int, split_seed: int, num_workers: int) -> tuple[list, list]:
    """Per-channel mean and std of the training images (streamed ones: estimated from 2,000 of them)."""
    images = train.images
    if images is None:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))[:2000]
        images = decode_all([train.samples[i] for i in pick.tolist()], image_size, num_workers)
    return channel_stats(images)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
