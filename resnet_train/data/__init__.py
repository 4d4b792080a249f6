"""Datasets -> batches on the training device.

Two ways in, one way out. Data that fits (CIFAR-10/100; image folders, manifests and Hugging Face
datasets decoded once at `image_size`) lives on the device as one uint8 NHWC tensor
(`MemoryLoader`); bigger ones are decoded by DataLoader workers (`StreamLoader`). Either way each batch reaches the device as
uint8 and is augmented, resized and normalized there, per batch, from a generator seeded by
(seed, epoch): the same seed gives the same batches.

    sources.py     CIFAR, and images (files, URLs, rows) -> uint8 tensors; splits; statistics
    folders.py     an image folder's tree -> (file, class) samples, links and odd files handled
    manifest.py    CSV / TSV / JSON Lines lists -> (path or URL, class) samples
    hf.py          Hugging Face datasets -> (row, class) samples and the reader of their images
    shards.py      WebDataset shards (local or any fsspec URL) -> a seeded, resumable stream; writing them
    storage.py     whether decoded images are held in memory or streamed
    loaders.py     batches of a split, in a seeded order, sharded over processes
    transforms.py  the per-batch augmentation and normalization on the device
    policies.py    per-image AutoAugment / RandAugment / TrivialAugment, cutout, random erasing
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import distributed
from ..config import DATASETS, IMAGE_SOURCES, stored_image_size
from ..errors import DataError
from .folders import scan_image_folder
from .loaders import Loader, MemoryLoader, Shard, StreamLoader, balanced_weights, epoch_generator
from .manifest import Columns, read_manifests
from .shards import IMAGE_KEYS, SampleFormat, ShardLoader, ShardSet, check_slots, count_samples, expand_pattern
from .sources import (
    CIFAR,
    DecodedFiles,
    Listing,
    Split,
    channel_stats,
    check_readable,
    decode_all,
    decode_resized,
    decoded_chunks,
    splits_to_read,
    load_cifar,
    stratified_split,
)
from .storage import plan_storage
from .transforms import Augment, BatchTransform, crop_flip, draw_augmentation

__all__ = ["Augment", "Batching", "BatchTransform", "CIFAR", "Data", "DataError", "DatasetSpec", "Loader",
           "MemoryLoader", "Shard", "ShardLoader", "StreamLoader", "build_data", "channel_stats", "class_names",
           "crop_flip", "decode_all", "decode_resized", "draw_augmentation", "epoch_generator", "load_cifar",
           "plan_storage", "scan_image_folder", "stratified_split"]

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
    class_counts: list[int] | None = None  # training images of each class


def resolve_val_size(val_size: int | float, n_train: int) -> int:
    n = round(val_size * n_train) if isinstance(val_size, float) else int(val_size)
    if n >= n_train:
        raise DataError(f"dataset.val_size={val_size} leaves no training images (the training split has {n_train})")
    return n


@dataclass(frozen=True)
class DatasetSpec:
    """Which images, and how they are prepared: the `dataset` config group."""

    name: str  # one of config.DATASETS
    root: str = ""  # CIFAR's and an image folder's
    image_size: int = 32  # what the model sees
    mean: Sequence[float] | None = None  # None (with normalize): computed from the training images
    std: Sequence[float] | None = None
    normalize: bool = True
    val_size: int | float = 0.1  # a count, a fraction of the training split, or 0 (validate on test)
    split_seed: int = 0
    download: bool = False
    loader: str = "memory"  # memory | stream | auto (memory when it fits)
    exif_transpose: bool = True  # image files turned upright as their EXIF orientation says
    # manifests (a CSV/TSV/JSON Lines file per split, or one with a split column) or WebDataset shards
    # (brace patterns of shard files or URLs), per split
    train: str | None = None
    val: str | None = None
    test: str | None = None
    path_column: str = "path"  # a manifest's columns
    label_column: str = "label"  # (also a Hugging Face dataset's)
    split_column: str = "split"
    # Hugging Face datasets: saved with save_to_disk, or a folder of parquet/arrow files (or a Hub name)
    path: str | None = None
    image_column: str = "image"
    # WebDataset shards
    image_key: str | Sequence[str] = IMAGE_KEYS  # a sample's image: the first of these extensions it has
    label_key: str = "cls"  # its label: a class index, or a class name
    num_classes: int | None = None  # integer labels without names (else `classes`)
    shuffle_buffer: int = 1000  # samples each decoding worker shuffles among
    # The class names in order (None: the training split's, sorted; shards need them, or num_classes);
    # resnet-eval and resnet-export give the model's.
    classes: Sequence[str] | None = None
    # Given by the commands, not the config
    splits: Sequence[str] = ("train", "val", "test")  # the splits a command reads


@dataclass(frozen=True)
class Batching:
    """How splits are read and become batches on the device."""

    batch_size: int  # the global training batch (split over a shard's processes)
    eval_batch_size: int
    augment: Augment | None = None  # training batches only
    seed: int = 0  # order and augmentation of each epoch
    num_workers: int = 0  # decoding processes
    channels_last: bool = True
    progress: bool | None = False  # progress bars while decoding and checking files (None: on a terminal)
    processes_here: int = 1  # training processes on this machine, each with its own in-memory copy
    sampler: str = "shuffle"  # shuffle: each training image once an epoch; balanced: each class equally often


def build_data(dataset: DatasetSpec, batching: Batching, device: torch.device, shard: Shard = Shard(),
               log=print) -> Data:
    """Read the dataset, split off validation images and wrap each split in a loader. With a
    `shard`, `batching.batch_size` is the global batch: each of the shard's processes gets an equal part."""
    if dataset.name == "webdataset":
        return _read_shards(dataset, batching, device, shard, log)
    stored_size = stored_image_size(dataset.name, dataset.image_size)
    if dataset.name in CIFAR:
        train, test, classes = load_cifar(dataset.name, Path(dataset.root).expanduser(), dataset.download)
        val, storage, separate_val = None, "memory", ""
    elif dataset.name in IMAGE_SOURCES:
        listing = _list_images(dataset, log)
        train, val, test, storage = _image_splits(listing, dataset, batching, device, log)
        classes, separate_val = listing.classes, listing.val_where
    else:
        raise DataError(f"dataset.name={dataset.name!r} is not one of {', '.join(DATASETS)}")
    train, val, val_source = _validation_split(train, val, test, dataset.val_size, dataset.split_seed, separate_val)
    if "train" not in dataset.splits:
        train = None  # (read only to hold the validation images out of it)
    if storage == "memory" and dataset.name in IMAGE_SOURCES:
        train, val, test = _decoded((train, val, test), dataset, batching)
    if train is not None and batching.batch_size > len(train):
        raise DataError(f"batch_size={batching.batch_size} is larger than the training split ({len(train):,} images)")
    stats = (lambda: _channel_stats_of(train, dataset, batching)) if train is not None else None
    mean, std = _normalization(dataset, stats, log)
    balanced = batching.sampler == "balanced"

    def make(split: Split | None, train_mode: bool) -> Loader | None:
        if split is None:
            return None
        transform = BatchTransform(mean, std, batching.augment if train_mode else None,
                                   dataset.image_size if dataset.image_size != stored_size else None,
                                   batching.channels_last)
        per_process = _per_process_batch(batching, shard, train_mode)
        weights = balanced_weights(split.labels) if train_mode and balanced else None
        if storage == "memory":
            return MemoryLoader(split.images.to(device), split.labels.to(device), per_process, transform, train_mode,
                                batching.seed, shard, weights)
        files = DecodedFiles(split.samples, dataset.image_size, dataset.exif_transpose, split.reader)
        return StreamLoader(files, per_process, transform, train_mode, device, batching.seed, batching.num_workers,
                            shard, weights)

    test_loader = make(test, False)
    val_loader = test_loader if val is test else make(val, False)
    train_loader = make(train, True)
    counts = train.labels.bincount(minlength=len(classes)).tolist() if train is not None else None
    return Data(train_loader, val_loader, test_loader, classes, mean, std, dataset.image_size, stored_size,
                val_source, storage, counts)


def _read_shards(dataset: DatasetSpec, batching: Batching, device: torch.device, shard: Shard, log) -> Data:
    """dataset.train/val/test shards (those given and needed), streamed; validation on the val
    shards, else the test shards (shards hold nothing out: dataset.val_size must be 0)."""
    if dataset.val_size != 0:
        raise DataError(f"dataset.val_size={dataset.val_size}: images cannot be held out of streamed shards; "
                        "give validation shards with dataset.val=... (dataset.val_size=0 validates on dataset.test)")
    if dataset.loader == "memory":
        raise DataError("dataset.loader=memory: shards are streamed (dataset.loader=stream or auto)")
    classes = _shard_classes(dataset)
    keys = (dataset.image_key,) if isinstance(dataset.image_key, str) else tuple(dataset.image_key)
    fmt = SampleFormat(keys, dataset.label_key, tuple(classes))
    splits = set(dataset.splits)
    if "val" in splits and dataset.val is None:
        splits.add("test")
    if "train" in splits and dataset.train is None:
        raise DataError("dataset=webdataset needs dataset.train=<shards>, e.g. "
                        "dataset.train='shards/train-{000000..000009}.tar'")
    shard_sets = {}
    for name in ("train", "val", "test"):
        pattern = getattr(dataset, name)
        if name in splits and pattern is not None:
            urls = expand_pattern(pattern, f"dataset.{name}", dataset.root)
            counts, how = count_samples(urls, fmt, batching.num_workers)
            if not sum(counts):
                raise DataError(f"dataset.{name}={pattern!r}: its {len(urls)} shard(s) hold no samples")
            empty = [url for url, n in zip(urls, counts) if not n]
            if name == "train" and empty:  # (a reader dealt only empty shards would wait forever)
                raise DataError(f"shard {empty[0]} holds no samples ({len(empty)} such in dataset.train): leave it "
                                "out of the pattern")
            shard_sets[name] = ShardSet(tuple(urls), tuple(counts))
            log(f"dataset.{name}: {len(urls):,} shard(s), {sum(counts):,} images (counted from {how})")
    if splits == {"test"} and "test" not in shard_sets:
        raise DataError("dataset.test is not set: there is no test split to evaluate (split=val evaluates dataset.val)")
    train = shard_sets.get("train")
    if train is not None and batching.batch_size > train.total:
        raise DataError(f"batch_size={batching.batch_size} is larger than the training split ({train.total:,} images)")
    if train is not None:
        check_slots(train, batching.num_workers, shard)

    def first_images_stats() -> tuple[list, list]:  # (estimated from the first 2,000)
        return channel_stats(ShardLoader(train, fmt, dataset.image_size, dataset.exif_transpose, 1,
                                         BatchTransform(None, None), False, device).first_images(STATS_IMAGES))
    mean, std = _normalization(dataset, first_images_stats if train is not None else None, log)

    def make(name: str, train_mode: bool) -> ShardLoader | None:
        if name not in shard_sets:
            return None
        transform = BatchTransform(mean, std, batching.augment if train_mode else None, None, batching.channels_last)
        per_process = _per_process_batch(batching, shard, train_mode)
        return ShardLoader(shard_sets[name], fmt, dataset.image_size, dataset.exif_transpose, per_process, transform,
                           train_mode, device, batching.seed, batching.num_workers, shard, dataset.shuffle_buffer)

    test = make("test", False)
    val = make("val", False) if "val" in shard_sets else test
    val_source = (f"dataset.val ({shard_sets['val'].total:,} images)" if "val" in shard_sets else
                  "the test shards (no dataset.val)" if test is not None else "none")
    return Data(make("train", True), val, test, classes, mean, std, dataset.image_size, dataset.image_size,
                val_source, "stream")


def _per_process_batch(batching: Batching, shard: Shard, train: bool) -> int:
    """A process's part of the global (training or evaluation) batch."""
    return (batching.batch_size if train else batching.eval_batch_size) // shard.world_size or 1


def _shard_classes(dataset: DatasetSpec) -> list[str]:
    """A shard run's class names: given, or for integer labels 0..num_classes-1 (shards are not read to find them)."""
    if dataset.classes is not None:
        return [str(c) for c in dataset.classes]
    if not dataset.num_classes:
        raise DataError("dataset=webdataset needs the class names, dataset.classes=[cat,dog,...], or for integer "
                        "labels dataset.num_classes=N")
    return [str(i) for i in range(dataset.num_classes)]


def _normalization(dataset: DatasetSpec, stats: Callable[[], tuple[list, list]] | None,
                   log) -> tuple[list[float] | None, list[float] | None]:
    """The mean and std batches are normalized with: given, computed from the training images
    (`stats`; None: there are none), or none."""
    if not dataset.normalize:
        return None, None
    mean, std = dataset.mean, dataset.std
    if mean is None or std is None:
        if stats is None:
            raise DataError("dataset.mean and dataset.std are needed: there are no training images to compute them from")
        computed = stats()
        mean, std = mean or computed[0], std or computed[1]
        log(f"Normalization computed from the training images: mean {_fmt(mean)}, std {_fmt(std)}")
    return list(mean), list(std)


def class_names(dataset: DatasetSpec) -> list[str]:
    """An image source's class names, from its training split (nothing decoded)."""
    if dataset.name == "webdataset":
        return _shard_classes(dataset)
    if dataset.classes is not None:
        return [str(c) for c in dataset.classes]
    return _list_images(replace(dataset, splits=("train",)), log=lambda line: None).classes


def _list_images(dataset: DatasetSpec, log) -> Listing:
    """The splits a command needs (train when it trains, defines the classes or holds validation
    images out of it; val and test when read -- test also stands in for val) of an image source."""
    splits = set(dataset.splits)
    if dataset.name == "manifest":
        return _list_manifests(dataset, splits)
    if dataset.name == "hf":
        from .hf import list_hf_dataset  # (imports `datasets` only when asked for)
        return list_hf_dataset(dataset, splits, log)
    return _list_image_folder(Path(dataset.root).expanduser().resolve(), dataset, splits, log)


def _list_manifests(dataset: DatasetSpec, splits: set[str]) -> Listing:
    splits = splits_to_read(splits, bool(dataset.val), dataset.val_size)
    files = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    found = read_manifests(files, Columns(dataset.path_column, dataset.label_column, dataset.split_column),
                           dataset.classes, splits)
    samples = {name: rows for name, rows in found.samples.items() if rows}
    if set(dataset.splits) == {"test"} and "test" not in samples:  # (resnet-eval split=test)
        raise DataError(f"{found.files.get('test') or dataset.train} lists no test images: there is no test split "
                        "to evaluate (split=val evaluates the validation images)")
    val_where = f"the val rows of {found.files['val']} ({len(samples['val']):,} images)" if "val" in samples else ""
    return Listing(samples, found.classes, str(found.files.get("train") or found.files.get("test")), val_where)


def _image_splits(listing: Listing, dataset: DatasetSpec, batching: Batching, device: torch.device,
                  log) -> tuple[Split | None, Split | None, Split | None, str]:
    """train, val and test (those listed) as samples, and where they will be kept (`dataset.loader`;
    auto: decoded into memory when they fit, else streamed)."""
    total = sum(len(samples) for samples in listing.samples.values())
    plan = plan_storage(total, dataset.image_size, dataset.loader, device, batching.processes_here,
                        batching.num_workers)
    # Every process of a run takes the same path: memory and stream shuffle from different generators,
    # and the processes' slices of each global batch must come from one order.
    storage = "stream" if "stream" in distributed.gather_objects(plan.storage) else plan.storage
    log(f"{listing.where}: {plan.line}" + ("; streamed, as another process of the run must" if storage != plan.storage
                                           else ""))
    if storage == "stream" and "train" in dataset.splits:
        check_readable([ref for samples in listing.samples.values() for ref, _ in samples], batching.num_workers,
                       batching.progress, listing.reader)

    def split(name: str) -> Split | None:
        if name not in listing.samples:
            return None
        samples = listing.samples[name]
        return Split(torch.tensor([label for _, label in samples]), samples=samples, reader=listing.reader)
    return split("train"), split("val"), split("test"), storage


def _decoded(splits: tuple[Split | None, ...], dataset: DatasetSpec, batching: Batching) -> list[Split | None]:
    """The splits' images decoded into memory, once each (validation may be the test split), after the
    validation images were held out: holding them out of decoded images would copy them all."""
    decoded: dict[int, Split] = {}
    for split in splits:
        if split is not None and id(split) not in decoded:
            decoded[id(split)] = Split(split.labels, images=decode_all(
                split.samples, dataset.image_size, batching.num_workers, dataset.exif_transpose, batching.progress,
                split.reader))
    return [None if split is None else decoded[id(split)] for split in splits]


def _list_image_folder(root: Path, dataset: DatasetSpec, splits: set[str], log) -> Listing:
    """root/train, root/val and root/test, those a command needs."""
    known = dataset.classes
    if splits == {"test"} and not (root / "test").is_dir():  # (resnet-eval split=test: before anything is read)
        raise DataError(f"{root / 'test'} does not exist: there is no test split to evaluate "
                        "(split=val evaluates the validation images)")
    splits = splits_to_read(splits, (root / "val").is_dir(), dataset.val_size)
    scans = {}
    if "train" in splits or known is None:
        index = None if known is None else {c: i for i, c in enumerate(known)}
        scans["train"] = scan_image_folder(root / "train", index, "the model", log)
    index = {c: i for i, c in enumerate(known if known is not None else scans["train"].classes)}
    for name in ("val", "test"):
        if name in splits and (root / name).is_dir():
            scans[name] = scan_image_folder(root / name, index, "train/" if known is None else "the model", log)
            shared = scans[name].real_paths & scans["train"].real_paths if "train" in scans else set()
            if shared:
                log(f"warning: {len(shared):,} files of {root / name} are also in {root / 'train'} (the same "
                    f"files, through links): accuracy on {name}/ overstates what the model learned")
    classes = list(known) if known is not None else scans["train"].classes
    val_where = f"{root / 'val'} ({len(scans['val'].samples):,} images)" if "val" in scans else ""
    return Listing({name: scan.samples for name, scan in scans.items()}, classes, str(root), val_where)


def _validation_split(train: Split | None, val: Split | None, test: Split | None, val_size: int | float,
                      split_seed: int, val_where: str) -> tuple[Split | None, Split | None, str]:
    """(train, val, where validation comes from): a val split of its own (`val_where`) as it is;
    val_size=0 validates on the test split; otherwise val_size images held out from training,
    stratified by class."""
    if val is not None:
        return train, val, val_where
    if val_size == 0:
        return train, test, ("the test split (dataset.val_size=0: training on every training image)"
                             if test is not None else "none")
    if train is None:
        return None, None, "none"
    n_val = resolve_val_size(val_size, len(train))
    train_idx, val_idx = stratified_split(train.labels, n_val, split_seed)
    source = f"{n_val:,} images held out from the training split (stratified, dataset.split_seed={split_seed})"
    return train.subset(train_idx), train.subset(val_idx), source


STATS_IMAGES = 2000  # a streamed set's statistics are estimated from this many of its images


def _channel_stats_of(train: Split, dataset: DatasetSpec, batching: Batching) -> tuple[list, list]:
    """Per-channel mean and std of the training images (streamed ones: estimated from 2,000 of them,
    decoded a chunk at a time and never held together)."""
    if train.images is not None:
        return channel_stats(train.images)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(dataset.split_seed))[:STATS_IMAGES]
    chunks = decoded_chunks([train.samples[i] for i in pick.tolist()], dataset.image_size, batching.num_workers,
                            dataset.exif_transpose, batching.progress, train.reader)
    return channel_stats(chunks)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
