"""Batches of one split on the training device: from memory (`MemoryLoader`) or decoded by DataLoader
workers (`StreamLoader`), in an order seeded by (seed, epoch), sharded over data-parallel processes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .sources import DecodedFiles
from .transforms import BatchTransform, epoch_generator
from .workers import from_workers, worker_init

Batch = tuple[torch.Tensor, torch.Tensor]


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


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Each image's chance to be drawn so that every class is drawn equally often (1 / its class's size)."""
    return 1.0 / labels.bincount()[labels].float()


def epoch_order(n: int, generator: torch.Generator, device: torch.device,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """The indices of an epoch's n draws: a permutation (each image once), or with `weights` n draws
    with replacement in proportion to them (the class-balanced sampler: rare classes repeat)."""
    if weights is None:
        return torch.randperm(n, generator=generator, device=device)
    return torch.multinomial(weights.to(device), n, replacement=True, generator=generator)


class MemoryLoader:
    """Batches sliced from uint8 NHWC images held on the training device. `batch_size` is per
    process; with a `shard` the epoch's order and augmentation are those of the global batch;
    with `weights` images are drawn in proportion to them (`epoch_order`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform: BatchTransform,
                 train: bool, seed: int = 0, shard: Shard = Shard(), weights: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        self.weights = None if weights is None else weights.to(images.device)
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
        order = epoch_order(len(self.labels), g, device, self.weights)
        for _ in range(self.skip):
            self.transform.skip(global_batch, self.images.shape[1], g)
        for i in range(self.skip, len(self)):
            idx = order[i * global_batch:(i + 1) * global_batch][mine]
            yield self.transform(self.images[idx], g, draws=global_batch, keep=mine), self.labels[idx]


class _EpochSampler(torch.utils.data.Sampler):
    """This process's indices of one epoch: for training its slice of each global batch of a
    permutation seeded by (seed, epoch), from global batch `start` on; for evaluation its shard."""

    def __init__(self, n: int, seed: int, train: bool, batch_size: int, shard: Shard,
                 weights: torch.Tensor | None = None):
        self.n, self.seed, self.train, self.batch_size, self.shard = n, seed, train, batch_size, shard
        self.weights = weights
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        if not self.train:
            return len(self.shard.eval_indices(self.n))
        return (self.shard.num_batches(self.n, self.batch_size, True) - self.start) * self.batch_size

    def __iter__(self):
        if not self.train:
            return iter(self.shard.eval_indices(self.n))
        cpu = torch.device("cpu")
        order = epoch_order(self.n, epoch_generator(self.seed, self.epoch, cpu), cpu, self.weights)
        global_batch, mine = self.batch_size * self.shard.world_size, self.shard.batch_slice(self.batch_size)
        batches = order[:self.n // global_batch * global_batch].view(-1, global_batch)[self.start:, mine]
        return iter(batches.reshape(-1).tolist())


class StreamLoader:
    """Image files decoded by DataLoader workers; augmentation still runs per batch on the device."""

    def __init__(self, files: DecodedFiles, batch_size: int, transform: BatchTransform, train: bool,
                 device: torch.device, seed: int = 0, num_workers: int = 2, shard: Shard = Shard(),
                 weights: torch.Tensor | None = None):
        self.transform, self.train, self.device, self.seed, self.shard = transform, train, device, seed, shard
        self.batch_size, self.epoch, self.skip, self.image_size = batch_size, 0, 0, files.size
        self.files = files
        self.sampler = _EpochSampler(len(files), seed, train, batch_size, shard, weights)
        # The loader's own generator: its iterators draw their workers' base seed from it, not from
        # the global RNG, which a resumed run restores and dropout draws from.
        self.loader = torch.utils.data.DataLoader(
            files, batch_size=batch_size, sampler=self.sampler, drop_last=train, num_workers=num_workers,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=worker_init(),
            generator=torch.Generator().manual_seed(seed))
        self.num_images = len(files)

    def __len__(self) -> int:
        """Batches in a whole epoch (also when this one starts after `skip` batches)."""
        return self.shard.num_batches(self.num_images, self.batch_size, self.train)

    def first_images(self, n: int) -> torch.Tensor:
        """The split's first `n` images, decoded (uint8 NHWC, on the CPU), in the split's order."""
        return torch.stack([self.files[i][0] for i in range(min(n, len(self.files)))])

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order and augmentation of `epoch`; start after its first `skip` batches (mid-epoch resume)."""
        self.epoch = self.sampler.epoch = epoch
        self.skip = self.sampler.start = skip if self.train else 0

    def __iter__(self) -> Iterator[Batch]:
        return device_batches(self, from_workers(self.loader))


def device_batches(loader, host: Iterable[Batch]) -> Iterator[Batch]:
    """A streaming loader's (StreamLoader's, ShardLoader's) uint8 batches from its workers, moved to
    its device and transformed there: training batches augmented from the (seed, epoch) generator,
    which draws for the whole global batch (this process's slice applied) and, resuming, first for
    the `skip` batches the epoch passes over."""
    g = epoch_generator(loader.seed, loader.epoch, loader.device) if loader.train else None
    global_batch, mine = loader.batch_size * loader.shard.world_size, loader.shard.batch_slice(loader.batch_size)
    for _ in range(loader.skip):
        loader.transform.skip(global_batch, loader.image_size, g)
    for images, labels in host:
        images = images.to(loader.device, non_blocking=True)
        yield (loader.transform(images, g, draws=global_batch, keep=mine),
               labels.to(loader.device, non_blocking=True))


Loader = MemoryLoader | StreamLoader

