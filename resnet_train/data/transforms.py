"""The per-batch augmentation and normalization of uint8 NHWC batches, on the training device.

Why ours and not torchvision's transforms: a batch lives on the device as one uint8 tensor, and
each image must draw its own crop, flip and policy op; torchvision's v2 transforms draw one set of
parameters for a whole batched tensor, and per-image transforms in DataLoader workers are what the
speed table shows to be the bottleneck. The ops follow torchvision's definitions; the crop, flip
and policy ops are tested against its per-image results.

A training batch goes through, in this order (each step optional, see `Augment`):
    crop (RandomCrop with padding, or RandomResizedCrop) + horizontal flip   uint8
    a policy op per image (TrivialAugment, RandAugment, AutoAugment)          uint8
    color jitter (brightness, contrast, saturation), resize, normalize         float
    cutout or random erasing (filled with 0, the mean color)                  float, normalized
All random numbers of a batch are drawn first (`BatchTransform.draw`), a fixed amount that depends
only on the batch size, so a resumed run skips a batch by drawing without applying.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from . import policies


@dataclass(frozen=True)
class Augment:
    """What training augmentation does to each image (the `augment` config group)."""

    crop: str = "pad"  # pad: RandomCrop(size, padding) | resized: RandomResizedCrop(size, crop_scale) | none
    crop_padding: int = 4
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    policy: str = "none"  # none | trivialaugment | randaugment | autoaugment (one op per image, per slot)
    num_ops: int = 2  # randaugment
    magnitude: int = 9  # randaugment
    color_jitter: float = 0.0  # brightness, contrast and saturation factors drawn from [1 - j, 1 + j]
    cutout: int = 0  # side of the Cutout square in pixels (0: off)
    erasing: float = 0.0  # RandomErasing probability (0: off)

    @property
    def active(self) -> bool:
        return (self.crop != "none" or self.hflip or self.policy != "none" or self.color_jitter > 0
                or self.cutout > 0 or self.erasing > 0)


@dataclass
class Draws:
    """One batch's random draws, per image (sliceable for a data-parallel shard)."""

    crop: torch.Tensor | None  # pad: (N, 2) offsets; resized: (N, 4) top, left, height, width
    flips: torch.Tensor  # (N,) bool
    policy: policies.PolicyParams | None
    jitter: torch.Tensor | None  # (N, 3) brightness, contrast, saturation factors
    erasing: policies.ErasingParams | None

    def __getitem__(self, rows: slice) -> Draws:
        pick = lambda v: None if v is None else v[rows]  # noqa: E731
        return Draws(pick(self.crop), self.flips[rows], pick(self.policy), pick(self.jitter), pick(self.erasing))


def draw_augmentation(batch_size: int, padding: int, hflip: bool,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


def draw_resized_crop(batch_size: int, size: int, scale: tuple[float, float], generator: torch.Generator,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (N, 4: top, left, height, width) as torchvision draws them: an area
    share in `scale` and an aspect ratio (log-uniform), the first of `attempts` that fits, else
    the whole image. Every image draws all its candidates at once (a fixed number of draws)."""
    g, device = generator, generator.device
    share = scale[0] + (scale[1] - scale[0]) * torch.rand(batch_size, attempts, generator=g, device=device)
    area = size * size * share
    log_ratio = torch.log(torch.tensor(ratio))  # (0-dim CPU values act as scalars: no host copy, no sync)
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(batch_size, attempts, generator=g,
                                                                                  device=device))
    width = torch.round(torch.sqrt(area * aspect)).long()
    height = torch.round(torch.sqrt(area / aspect)).long()
    fits = (width > 0) & (width <= size) & (height > 0) & (height <= size)
    first = torch.where(fits, torch.arange(attempts, device=device), attempts).amin(1, keepdim=True)
    found = first[:, 0] < attempts
    first = first.clamp(max=attempts - 1)
    height = torch.where(found, height.gather(1, first)[:, 0], size)
    width = torch.where(found, width.gather(1, first)[:, 0], size)
    u = torch.rand(batch_size, 2, generator=g, device=device)
    top = (u[:, 0] * (size - height + 1)).long().clamp(max=size - height)
    left = (u[:, 1] * (size - width + 1)).long().clamp(max=size - width)
    return torch.stack([top, left, height, width], 1)


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each image's box resized back to the full size (bilinear, one grid_sample for the batch), then
    flipped where asked; uint8 NHWC in and out."""
    b, h, w, _ = images.shape
    box = boxes.float()
    scale_x, scale_y = box[:, 3] / w, box[:, 2] / h
    center_x = (box[:, 1] + box[:, 3] / 2) / w * 2 - 1  # the box center in grid_sample's [-1, 1] coordinates
    center_y = (box[:, 0] + box[:, 2] / 2) / h * 2 - 1
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = torch.where(flips, -scale_x, scale_x)
    theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = center_x, scale_y, center_y
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    x = F.grid_sample(images.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation (torchvision's definitions: blends with black, the mean
    gray level and the grayscale image) with per-image factors, on float NCHW pixels in 0..255."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * brightness).clamp(0, 255)
    gray_mean = policies.grayscale(x).mean((1, 2, 3), keepdim=True)
    x = (gray_mean + contrast * (x - gray_mean)).clamp(0, 255)
    gray = policies.grayscale(x)
    return (gray + saturation * (x - gray)).clamp(0, 255)


@dataclass
class BatchTransform:
    """uint8 NHWC batch -> normalized float NCHW batch, with train-time augmentation (`augment`)
    when called with a generator."""

    mean: Sequence[float] | None  # None: no normalization, only scaling to [0, 1]
    std: Sequence[float] | None
    augment: Augment | None = None
    output_size: int | None = None  # resize (bilinear) when the stored size differs
    channels_last: bool = True
    _cached: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def augments(self) -> bool:
        return self.augment is not None and self.augment.active

    def draw(self, batch_size: int, image_size: int, generator: torch.Generator) -> Draws:
        """Every random number of one batch, in a fixed order and amount."""
        a, g = self.augment, generator
        crop = None
        if a.crop == "pad":
            crop, flips = draw_augmentation(batch_size, a.crop_padding, a.hflip, g)
        else:
            flips = (torch.rand(batch_size, generator=g, device=g.device) < 0.5) & a.hflip
            if a.crop == "resized":
                crop = draw_resized_crop(batch_size, image_size, a.crop_scale, g)
        options = {"num_ops": a.num_ops, "magnitude": a.magnitude} if a.policy == "randaugment" else {}
        policy = policies.draw_policy(a.policy, batch_size, image_size, g, **options) if a.policy != "none" else None
        jitter = None
        if a.color_jitter > 0:
            jitter = 1 + a.color_jitter * (2 * torch.rand(batch_size, 3, generator=g, device=g.device) - 1)
        erasing = None
        if a.cutout > 0:
            erasing = policies.draw_cutout(batch_size, image_size, g, size=a.cutout)
        elif a.erasing > 0:
            erasing = policies.draw_erasing(batch_size, image_size, g, p=a.erasing)
        return Draws(crop, flips, policy, jitter, erasing)

    def skip(self, batch_size: int, image_size: int, generator: torch.Generator) -> None:
        """Consume the random draws of one batch without transforming it (resuming mid-epoch)."""
        if self.augments:
            self.draw(batch_size, image_size, generator)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 draws: int | None = None, keep: slice | None = None) -> torch.Tensor:
        """Augment (with `generator`), resize and normalize. Under data parallelism each process gets
        one slice of a global batch: `draws` random draws are made for the whole global batch and
        the `keep` slice of them applies to `images`, so every image is augmented as in one process."""
        d = None
        if generator is not None and self.augments:
            d = self.draw(draws or len(images), images.shape[1], generator)
            d = d[keep] if keep is not None else d
            images = self._geometric(images, d)
            if d.policy is not None:
                images = policies.apply_policy(images, d.policy)
        x = images.permute(0, 3, 1, 2).float()  # NCHW view with channels_last strides
        if d is not None and d.jitter is not None:
            x = color_jitter(x, d.jitter)
        if self.output_size is not None and x.shape[-1] != self.output_size:
            # antialiasing matters only when shrinking; upscaling (32 -> 224) with it picks a slower kernel
            x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear",
                              antialias=self.output_size < x.shape[-1])
        if self.mean is not None:
            mean, std = self._stats(x.device)
            x = (x - mean) / std
        else:
            x = x / 255
        if d is not None and d.erasing is not None:
            x = self._erase(x, d.erasing, images.shape[1])
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _geometric(self, images: torch.Tensor, d: Draws) -> torch.Tensor:
        a = self.augment
        if a.crop == "pad":
            return crop_flip(images, a.crop_padding, d.crop, d.flips)
        if a.crop == "resized":
            return resized_crop_flip(images, d.crop, d.flips)
        return torch.where(d.flips[:, None, None, None], images.flip(2), images) if a.hflip else images

    def _erase(self, x: torch.Tensor, erasing: policies.ErasingParams, stored_size: int) -> torch.Tensor:
        """Boxes were drawn at the stored size; scale them when the model sees another size."""
        if x.shape[-1] != stored_size:
            ratio = x.shape[-1] / stored_size
            erasing = policies.ErasingParams(*((getattr(erasing, f) * ratio).long()
                                               for f in ("top", "left", "height", "width")))
        return policies.apply_erasing(x, erasing)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std (0..255 scale) as device tensors, made once: a copy per batch would sync."""
        if self._cached is None or self._cached[0].device != device:
            self._cached = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) * 255 for v in (self.mean, self.std))
        return self._cached


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """One generator per (seed, epoch): order and augmentation of an epoch depend on nothing else."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)

