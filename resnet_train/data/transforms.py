"""The per-batch augmentation and normalization of uint8 NHWC batches, on the training device.

Why ours and not torchvision's transforms: a batch lives on the device as one uint8 tensor, and
each image must draw its own crop, flip and policy op; torchvision's v2 transforms draw one set of
parameters for a whole batched tensor, and per-image transforms in DataLoader workers are what the
speed table shows to be the bottleneck. The ops themselves follow torchvision's definitions and are
tested against its per-image results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


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


