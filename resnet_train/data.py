"""Datasets → batches on the training device.

Two ways in, one way out. Data that fits (CIFAR-10/100, image folders decoded once at
`image_size`) lives on the device as one uint8 NHWC tensor (`MemoryLoader`); bigger image folders
are decoded by DataLoader workers (`StreamLoader`). Either way each batch reaches the device as
uint8 and `BatchTransform` crops, flips, resizes and normalizes it there, per batch, from a
generator seeded by (seed, epoch): the same seed gives the same batches.
"""

from __future__ import annotations

import math
import os
import signal
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2 import functional as TF

from .errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]

# --------------------------------------------------------------------------------------------
# Per-batch augmentation and normalization (runs on the training device)
# --------------------------------------------------------------------------------------------


def draw_augmentation(batch_size: int, padding: int, hflip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets (B, 2: top, left) in [0, 2*padding] and flip flags (B,)."""
    device = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator, device=device)
    flips = torch.rand(batch_size, generator=generator, device=device) < 0.5
    return offsets, flips & hflip


def crop_flip(images: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip for a uint8 NHWC batch, as one gather."""
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # zero fill, like RandomCrop
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip is a reversed column order
    return padded[torch.arange(b, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclass
class BatchTransform:
    """uint8 NHWC batch → normalized float NCHW batch, with train-time augmentation on demand."""

    mean: Sequence[float] | None  # None: no normalization, only scaling to [0, 1]
    std: Sequence[float] | None
    crop_padding: int = 0
    hflip: bool = False
    output_size: int | None = None  # resize (bilinear) when the stored size differs
    channels_last: bool = True
    _cached: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def skip(self, batch_size: int, generator: torch.Generator) -> None:
        """Consume the random draws of one batch without transforming it (resuming mid-epoch)."""
        if self.augments:
            draw_augmentation(batch_size, self.crop_padding, self.hflip, generator)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 draws: int | None = None, keep: slice | None = None) -> torch.Tensor:
        """Augment (with `generator`), resize and normalize. Under data parallelism each process gets
        one slice of a global batch: `draws` random draws are made for the whole global batch and
        the `keep` slice of them applies to `images`, so every image is augmented as in one process."""
        if generator is not None and self.augments:
            offsets, flips = draw_augmentation(draws or len(images), self.crop_padding, self.hflip, generator)
            if keep is not None:
                offsets, flips = offsets[keep], flips[keep]
            images = crop_flip(images, self.crop_padding, offsets, flips)
        x = images.permute(0, 3, 1, 2).float()  # NCHW view with channels_last strides
        if self.output_size is not None and x.shape[-1] != self.output_size:
            # antialiasing matters only when shrinking; upscaling (32 -> 224) with it picks a slower kernel
            x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear",
                              antialias=self.output_size < x.shape[-1])
        if self.mean is not None:
            mean, std = self._stats(x.device)
            x = (x - mean) / std
        else:
            x = x / 255
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std (0..255 scale) as device tensors, made once: a copy per batch would sync."""
        if self._cached is None or self._cached[0].device != device:
            self._cached = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) * 255 for v in (self.mean, self.std))
        return self._cached


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """One generator per (seed, epoch): order and augmentation of an epoch depend on nothing else."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's part of the data when `world_size` processes train one model: of each global
    training batch the `rank`-th slice, of evaluation data every `world_size`-th image."""

    rank: int = 0
    world_size: int = 1

    def batch_slice(self, batch_size: int) -> slice:
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def eval_indices(self, n: int) -> range:
        return range(self.rank, n, self.world_size)

    def num_batches(self, n: int, batch_size: int, train: bool) -> int:
        """Batches of `batch_size` per process in an epoch of `n` images: full global batches when
        training, every image of the shard when evaluating."""
        if train:
            return n // (batch_size * self.world_size)
        return math.ceil(len(self.eval_indices(n)) / batch_size)


class MemoryLoader:
    """Batches sliced from uint8 NHWC images held on the training device. `batch_size` is per
    process; with a `shard` the epoch's order and augmentation are those of the global batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform: BatchTransform,
                 train: bool, seed: int = 0, shard: Shard = Shard()):
        self.images, self.labels = images, labels
        self.batch_size, self.transform, self.train, self.seed, self.shard = batch_size, transform, train, seed, shard
        self.epoch, self.skip = 0, 0
        self.eval_order = None if train else torch.tensor(shard.eval_indices(len(labels)), device=images.device)

    def __len__(self) -> int:
        """Batches in a whole epoch (also when this one starts after `skip` batches)."""
        return self.shard.num_batches(len(self.labels), self.batch_size, self.train)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order and augmentation of `epoch`; start after its first `skip` batches (mid-epoch resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[Batch]:
        device = self.images.device
        if not self.train:
            for i in range(len(self)):
                idx = self.eval_order[i * self.batch_size:(i + 1) * self.batch_size]
                yield self.transform(self.images[idx]), self.labels[idx]
            return
        # shuffled, full batches only (BatchNorm dislikes a batch of 1)
        global_batch = self.batch_size * self.shard.world_size
        mine = self.shard.batch_slice(self.batch_size)
        g = epoch_generator(self.seed, self.epoch, device)
        order = torch.randperm(len(self.labels), generator=g, device=device)
        for _ in range(self.skip):
            self.transform.skip(global_batch, g)
        for i in range(self.skip, len(self)):
            idx = order[i * global_batch:(i + 1) * global_batch][mine]
            yield self.transform(self.images[idx], g, draws=global_batch, keep=mine), self.labels[idx]


class _DecodedFiles(torch.utils.data.Dataset):
    """Files → uint8 HWC tensors at `size` x `size` (shorter side resized, then center-cropped)."""

    def __init__(self, samples: list[tuple[str, int]], size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return decode_resized(path, self.size).permute(1, 2, 0), label


class _EpochSampler(torch.utils.data.Sampler):
    """This process's indices of one epoch: for training its slice of each global batch of a
    permutation seeded by (seed, epoch), from global batch `start` on; for evaluation its shard."""

    def __init__(self, n: int, seed: int, train: bool, batch_size: int, shard: Shard):
        self.n, self.seed, self.train, self.batch_size, self.shard = n, seed, train, batch_size, shard
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        if not self.train:
            return len(self.shard.eval_indices(self.n))
        return (self.shard.num_batches(self.n, self.batch_size, True) - self.start) * self.batch_size

    def __iter__(self):
        if not self.train:
            return iter(self.shard.eval_indices(self.n))
        order = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch, torch.device("cpu")))
        global_batch, mine = self.batch_size * self.shard.world_size, self.shard.batch_slice(self.batch_size)
        batches = order[:self.n // global_batch * global_batch].view(-1, global_batch)[self.start:, mine]
        return iter(batches.reshape(-1).tolist())


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamLoader:
    """Image files decoded by DataLoader workers; augmentation still runs per batch on the device."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, batch_size: int, transform: BatchTransform,
                 train: bool, device: torch.device, seed: int = 0, num_workers: int = 2, shard: Shard = Shard()):
        self.transform, self.train, self.device, self.seed, self.shard = transform, train, device, seed, shard
        self.batch_size, self.epoch, self.skip = batch_size, 0, 0
        self.sampler = _EpochSampler(len(samples), seed, train, batch_size, shard)
        self.loader = torch.utils.data.DataLoader(
            _DecodedFiles(samples, image_size), batch_size=batch_size, sampler=self.sampler, drop_last=train,
            num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=_ignore_sigint)
        self.num_images = len(samples)

    def __len__(self) -> int:
        """Batches in a whole epoch (also when this one starts after `skip` batches)."""
        return self.shard.num_batches(self.num_images, self.batch_size, self.train)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order and augmentation of `epoch`; start after its first `skip` batches (mid-epoch resume)."""
        self.epoch = self.sampler.epoch = epoch
        self.skip = self.sampler.start = skip if self.train else 0

    def __iter__(self) -> Iterator[Batch]:
        g = epoch_generator(self.seed, self.epoch, self.device) if self.train else None
        global_batch, mine = self.batch_size * self.shard.world_size, self.shard.batch_slice(self.batch_size)
        for _ in range(self.skip):
            self.transform.skip(global_batch, g)
        for images, labels in from_workers(self.loader):
            images = images.to(self.device, non_blocking=True)
            yield (self.transform(images, g, draws=global_batch, keep=mine),
                   labels.to(self.device, non_blocking=True))


Loader = MemoryLoader | StreamLoader

# --------------------------------------------------------------------------------------------
# Reading datasets from disk
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Images of one split: decoded (`images`, uint8 NHWC) or as file paths (`samples`)."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    samples: list[tuple[str, int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.labels[idx],
                     None if self.images is None else self.images[idx],
                     None if self.samples is None else [self.samples[i] for i in idx.tolist()])


CIFAR = {"cifar10": (datasets.CIFAR10, "CIFAR-10"), "cifar100": (datasets.CIFAR100, "CIFAR-100")}


def load_cifar(name: str, root: str | Path, download: bool) -> tuple[Split, Split, list[str]]:
    """CIFAR-10/100 train and test splits from `root/cifar-10(0)-batches-py` (downloaded if allowed)."""
    cls, title = CIFAR[name]
    root = Path(root).expanduser().resolve()
    folder = root / cls.base_folder
    try:
        train = cls(root, train=True, download=False)
    except RuntimeError:
        if not download:
            raise DataError(_cifar_help(cls, title, root, folder, "dataset.download=false")) from None
        try:
            train = _quiet_download(cls, root)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise DataError(_cifar_help(cls, title, root, folder, f"downloading it failed ({_reason(e)})")) from None
    except Exception as e:  # unreadable pickles
        raise DataError(f"{title} files in {folder} could not be read ({e}); delete them to download again") from None
    test = cls(root, train=False)

    def split(ds) -> Split:
        return Split(torch.as_tensor(ds.targets, dtype=torch.int64), images=torch.from_numpy(np.ascontiguousarray(ds.data)))
    return split(train), split(test), list(train.classes)


def _quiet_download(cls, root: Path):
    """Download into `root`; a failed download leaves no empty folders behind."""
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        return cls(root, train=True, download=True)
    except BaseException:
        for p in created:  # deepest first
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e)


def _cifar_help(cls, title: str, root: Path, folder: Path, why: str) -> str:
    state = "has files that failed the integrity check" if folder.is_dir() else "does not exist"
    return (f"no usable {title} in dataset.root={root}: {folder} {state}, and {why}. To provide it offline, "
            f"fetch {cls.url} on a machine with internet and put {cls.filename} into {root} (or extract it there, "
            f"giving {folder}/), or point dataset.root at a folder that contains {cls.base_folder}/")


def decode_resized(path: str, size: int) -> torch.Tensor:
    """Decode one image file as RGB uint8 CHW, shorter side resized to `size`, center-cropped square."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the image is much larger
            img = TF.pil_to_tensor(_as_8bit_rgb(im, path))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read image {path}: {e}") from None
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), size)
    return img


def _as_8bit_rgb(im: Image.Image, path: str) -> Image.Image:
    """RGB with 8 bits per channel. PIL's convert("RGB") clips 16-bit grayscale (mode I;16, I) at 255
    -- a 0..65535 gradient becomes almost all white -- so those are scaled down (>> 8) first."""
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"could not read image {path}: {im.mode} pixel values outside 0..65535 "
                            "(convert it to an 8- or 16-bit image)")
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise DataError(f"could not read image {path}: floating-point pixels (mode F) have no fixed range; "
                        "convert it to an 8- or 16-bit image")
    return im.convert("RGB")


def list_image_folder(folder: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and class names of an ImageFolder-style tree (`folder/<class>/<image>`)."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; expected {folder}/<class>/<image files>")
    try:
        classes, found_idx = find_classes(folder)
    except FileNotFoundError:
        raise DataError(f"no class folders in {folder}; expected {folder}/<class>/<image files>") from None
    if class_to_idx is not None:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise DataError(f"{folder} has classes that train/ does not: {', '.join(unknown[:10])}")
    samples = make_dataset(folder, class_to_idx or found_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"no images in the class folders of {folder} (looked for {', '.join(IMG_EXTENSIONS)})")
    if class_to_idx is None:  # the training split defines the classes: each needs images, and two at least
        counts = Counter(label for _, label in samples)
        empty = [c for i, c in enumerate(classes) if not counts[i]]
        if empty:
            raise DataError(f"class folder {folder / empty[0]} has no images ({len(empty)} empty in all); "
                            "add images or remove the folder")
        if len(classes) < 2:
            raise DataError(f"{folder} has one class ({classes[0]}); a classifier needs at least two class folders")
    return samples, classes


def decode_all(samples: list[tuple[str, int]], size: int, num_workers: int) -> torch.Tensor:
    """Decode every file once, in parallel, into one uint8 NHWC tensor."""
    loader = torch.utils.data.DataLoader(_DecodedFiles(samples, size), batch_size=256, num_workers=num_workers)
    out = torch.empty((len(samples), size, size, 3), dtype=torch.uint8)
    i = 0
    for images, _ in from_workers(loader):
        out[i:i + len(images)] = images
        i += len(images)
    return out


def from_workers(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Iterate `loader`; a DataError raised in a worker process arrives as one line again (PyTorch
    re-raises it with the worker's whole traceback as its message)."""
    try:
        yield from loader
    except DataError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise DataError(lines[-1].split("DataError: ", 1)[-1] if lines else str(e)) from None


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with `val_size` val images drawn per class in proportion to its size."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    classes, counts = labels.unique(return_counts=True)
    share = counts.double() * val_size / n
    quota = share.floor().long()
    leftover = val_size - int(quota.sum())
    quota[torch.argsort(share - quota, descending=True, stable=True)[:leftover]] += 1  # largest remainders
    shuffled = labels[perm]
    val = torch.cat([perm[shuffled == c][:q] for c, q in zip(classes.tolist(), quota.tolist())])
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().squeeze(1), val.sort().values


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) of uint8 NHWC images."""
    x = images.reshape(-1, images.shape[-1]).double() / 255
    return x.mean(0).tolist(), x.std(0).tolist()


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
               normalize: bool, augment: dict, val_size: int | float, split_seed: int, download: bool = True,
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
        val = to_split(list_image_folder(root_path / "val", class_to_idx)[0]) if (root_path / "val").is_dir() else None
        test = to_split(list_image_folder(root_path / "test", class_to_idx)[0]) if (root_path / "test").is_dir() else None
        total = sum(len(s) for s in (train, val, test) if s is not None)
        storage = loader
        if loader == "auto":
            storage = "memory" if total * image_size ** 2 * 3 <= memory_budget_bytes(device) else "stream"
        stored_size = image_size
        if storage == "memory":
            log(f"Decoding {total:,} images from {root_path} at {image_size}x{image_size} into memory")
            train, val, test = (None if s is None else Split(s.labels, images=decode_all(s.samples, image_size, num_workers))
                                for s in (train, val, test))
    else:
        raise DataError(f"dataset.name={name!r} is not one of cifar10, cifar100, image_folder")

    if val is not None:
        val_source = f"{root_path / 'val'} ({len(val):,} images)"
    elif val_size == 0:
        val = test
        val_source = "the test split (dataset.val_size=0: training on every training image)" if test is not None else "none"
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
        transform = BatchTransform(mean, std, augment.get("crop_padding", 0) if train_mode else 0,
                                   augment.get("hflip", False) and train_mode,
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
