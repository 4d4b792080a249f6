"""MixUp and CutMix of training batches, switched per batch as torchvision's reference does.

A mixed batch pairs each image with the previous one in the batch (`roll` by one, as torchvision's
RandomMixUp / RandomCutMix do), so the targets are (labels, rolled labels, lam) and the loss is
lam * CE(labels) + (1 - lam) * CE(rolled): cross entropy against the mixed one-hot (with label
smoothing, the smoothed mix). Draws come from a CPU generator seeded by (seed, epoch), a fixed
number per batch, so a resumed run skips batches by drawing without mixing. Under data
parallelism every process draws the same numbers and mixes within its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Mixed:
    images: torch.Tensor
    labels: torch.Tensor
    other: torch.Tensor  # the label of the image mixed in
    lam: float  # the share of `labels` (1.0: not mixed)

    def loss(self, logits: torch.Tensor, label_smoothing: float, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Cross entropy against the mix; with class `weight`s, the weighted mean (torch's: over the
        weights of the images' labels)."""
        loss = F.cross_entropy(logits, self.labels, weight=weight, label_smoothing=label_smoothing)
        if self.lam == 1.0:
            return loss
        return self.lam * loss + (1 - self.lam) * F.cross_entropy(logits, self.other, weight=weight,
                                                                  label_smoothing=label_smoothing)

    @property
    def dominant(self) -> torch.Tensor:
        """The labels train accuracy is counted against: the one with the larger share of each image."""
        return self.labels if self.lam >= 0.5 else self.other


class Mixer:
    """MixUp (alpha `mixup_alpha`) and CutMix (`cutmix_alpha`); a batch is mixed with probability
    `prob`, by CutMix with probability `switch_prob` when both are on."""

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0):
        # (floats: `mix.cutmix_alpha=1` arrives as an int, and the Beta draw takes floating tensors only)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.seed, self.generator = seed, torch.Generator()

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch + 7_919)  # (apart from the data's generator)
        for _ in range(skip):
            self._draw()

    def _draw(self) -> tuple[bool, bool, float, float, float, float]:
        """mix?, cutmix?, mixup lam, cutmix lam, box center (x, y): six numbers per batch, always."""
        u = torch.rand(4, generator=self.generator).tolist()  # (host tensors: no device sync)
        lams = [torch._sample_dirichlet(torch.tensor([a or 1.0, a or 1.0]), generator=self.generator)[0].item()
                for a in (self.mixup_alpha, self.cutmix_alpha)]
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or u[1] < self.switch_prob)
        return u[0] < self.prob, cutmix, lams[0], lams[1], u[2], u[3]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Mixed:
        mix, cutmix, lam_mixup, lam_cutmix, cx, cy = self._draw()
        if not (self.active and mix):
            return Mixed(images, labels, labels, 1.0)
        other = labels.roll(1, 0)
        if not cutmix:
            return Mixed(images.lerp(images.roll(1, 0), 1 - lam_mixup), labels, other, lam_mixup)
        h, w = images.shape[-2:]
        cut_h, cut_w = h * (1 - lam_cutmix) ** 0.5, w * (1 - lam_cutmix) ** 0.5
        top, bottom = max(int(cy * h - cut_h / 2), 0), min(int(cy * h + cut_h / 2), h)  # clipped at the borders
        left, right = max(int(cx * w - cut_w / 2), 0), min(int(cx * w + cut_w / 2), w)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images.roll(1, 0)[..., top:bottom, left:right]
        return Mixed(mixed, labels, other, 1 - (bottom - top) * (right - left) / (h * w))  # the box's true share
