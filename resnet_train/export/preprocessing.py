"""The training-time preprocessing, inside an exported graph (`WithPreprocessing`) or in front of one
that leaves it out (`preprocess`): uint8 RGB images (N, S, S, 3) in, normalized float32 NCHW out."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError


def normalization_constants(mean: Sequence[float] | None,
                            std: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, divisor) on the 0..255 scale, shaped (1, 3, 1, 1): x_normalized = (x - offset) / divisor.
    The same numbers data.BatchTransform uses; without mean/std it is x / 255."""
    if mean is None or std is None:
        return torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 255.0)
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255,
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)


def _normalize(images: torch.Tensor, offset: torch.Tensor, divisor: torch.Tensor,
               size: int | None = None) -> torch.Tensor:
    """What data.BatchTransform does to evaluation batches: NCHW float, resized to `size` when given
    (bilinear; antialiased only when shrinking), normalized."""
    x = images.permute(0, 3, 1, 2).float()
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=size < x.shape[-1])
    return (x - offset) / divisor


def preprocess(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
               size: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalized float32 (N, 3, size, size), as in training."""
    return _normalize(images, *normalization_constants(mean, std), size)


class WithPreprocessing(nn.Module):
    """`model` with the training-time preprocessing in front: takes uint8 RGB images (N, H, W, 3),
    scales, resizes to `size` (when given), normalizes and transposes them to NCHW itself, so an
    exported graph needs no mean/std."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                 size: int | None = None):
        super().__init__()
        self.model, self.size = model, size
        offset, divisor = normalization_constants(mean, std)
        self.register_buffer("offset", offset)
        self.register_buffer("divisor", divisor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_normalize(images, self.offset, self.divisor, self.size))


def as_image_batch(images: np.ndarray | torch.Tensor, image_size: int, culprit: str) -> torch.Tensor:
    """uint8 (N, S, S, 3) as a contiguous CPU tensor, or ExportError saying what `culprit` expects."""
    batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    expected = (image_size, image_size, 3)
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.dim() != 4 \
            or tuple(batch.shape[1:]) != expected or len(batch) == 0:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
        raise ExportError(f"{culprit} takes uint8 images of shape (N, {image_size}, {image_size}, 3), got {got}")
    return batch.cpu().contiguous()
