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

__all__ = ["Augment", "BatchTransform", "CIFAR", "Data", "DataError", "Loader", "MemoryLoader", "Shard", "StreamLoader",
           "build_data", "channel_stats", "crop_flip", "decode_all", "decode_resized", "draw_augmentation",
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


def build_data(name: str, root: str, *, image_size: int, mean: Sequence[float] | None, std: Sequence[float] | None,
               normalize: bool, augment: Augment | None, val_size: int | float, split_seed: int, download: bool = True,
               loader: str = "memory", batch_size: int, eval_batch_size: int, device: torch.device, seed: int,
               num_workers: int, channels_last: bool, shard: Shard = Shard(), log=print) -> Data:
    """Read the dataset, split off validation images and wrap each split in a loader. With a
    `shard`, `batch_size` is the global batch: each of the shard's processes gets an equal part."""
    root_path = Path(root).expanduser()
    if name in CIFAR:
        train, test, classes = load_cifar(name, root_path, download)
        val = None
        storage, stored_size = "memory", 32
    elif name == "image_folder":
        root_path = root_path.resolve()
        samples, classes = list_image_folder(root_path / "train")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        to_split = lambda s: Split(torch.tensor([label for _, label in s]), samples=s)  # noqa: E731
        train = to_split(samples)

        def optional_split(name: str) -> Split | None:
            folder = root_path / name
            return to_split(list_image_folder(folder, class_to_idx)[0]) if folder.is_dir() else None

        val, test = optional_split("val"), optional_split("test")
        total = sum(len(s) for s in (train, val, test) if s is not None)
        storage = loader
        if loader == "auto":
            storage = "memory" if total * image_size ** 2 * 3 <= memory_budget_bytes(device) else "stream"
        stored_size = image_size
        if storage == "memory":
            log(f"Decoding {total:,} images from {root_path} at {image_size}x{image_size} into memory")
            train, val, test = (None if s is None
                                else Split(s.labels, images=decode_all(s.samples, image_size, num_workers))
                                for s in (train, val, test))
    else:
        raise DataError(f"dataset.name={name!r} is not one of cifar10, cifar100, image_folder")

    if val is not None:
        val_source = f"{root_path / 'val'} ({len(val):,} images)"
    elif val_size == 0:
        val = test
        val_source = ("the test split (dataset.val_size=0: training on every training image)"
                      if test is not None else "none")
    else:
        n_val = resolve_val_size(val_size, len(train))
        train_idx, val_idx = stratified_split(train.labels, n_val, split_seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
        val_source = f"{n_val:,} images held out from the training split (stratified, dataset.split_seed={split_seed})"
    if batch_size > len(train):
        raise DataError(f"batch_size={batch_size} is larger than the training split ({len(train):,} images)")

    if normalize and (mean is None or std is None):
        stats_images = train.images
        if stats_images is None:  # streaming: estimate from a sample
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))[:2000]
            stats_images = decode_all([train.samples[i] for i in pick.tolist()], image_size, num_workers)
        computed = channel_stats(stats_images)
        mean, std = mean or computed[0], std or computed[1]
        log(f"Normalization computed from the training images: mean {_fmt(mean)}, std {_fmt(std)}")
    mean, std = (list(mean), list(std)) if normalize else (None, None)

    def make(split: Split | None, train_mode: bool) -> Loader | None:
        if split is None:
            return None
        transform = BatchTransform(mean, std, augment if train_mode else None,
                                   image_size if image_size != stored_size else None, channels_last)
        bs = (batch_size if train_mode else eval_batch_size) // shard.world_size or 1  # per process
        if storage == "memory":
            return MemoryLoader(split.images.to(device), split.labels.to(device), bs, transform, train_mode, seed,
                                shard)
        return StreamLoader(split.samples, image_size, bs, transform, train_mode, device, seed, num_workers, shard)

    test_loader = make(test, False)
    val_loader = test_loader if val is test else make(val, False)
    return Data(make(train, True), val_loader, test_loader, classes, mean, std, image_size, stored_size, val_source,
                storage)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
