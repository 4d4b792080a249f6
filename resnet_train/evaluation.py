"""Evaluation: loss, accuracy, top-5, the confusion matrix and the most confident mistakes of a
model on a split, with test-time augmentation.

Sums stay on the device and are read once at the end (with a visible progress bar, every 10
batches); with several processes each evaluates its shard and the sums are added up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Loader
from .device import Precision
from .progress import progress_bar


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    images: int
    seconds: float
    confusion: torch.Tensor  # (classes, classes) counts: rows true, columns predicted
    mistakes: Mistakes | None = None  # the most confident wrong predictions, when asked for
    top5_accuracy: float | None = None  # with more than 5 classes

    @property
    def per_class_accuracy(self) -> list[float]:
        """Each class's share of its images predicted right (its recall)."""
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / totals).tolist()

    def per_class(self, classes: list[str]) -> dict[str, dict[str, float | int]]:
        """class -> accuracy (= recall), precision, recall, F1 and support (its images). A class never
        predicted has precision 0 (scikit-learn's zero_division=0), as one without images has recall 0."""
        right = self.confusion.diag().float()
        support, predicted = self.confusion.sum(1), self.confusion.sum(0)
        recall = right / support.clamp(min=1)
        precision = right / predicted.clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
        return {name: {"accuracy": r, "precision": p, "recall": r, "f1": f, "support": n}
                for name, r, p, f, n in zip(classes, recall.tolist(), precision.tolist(), f1.tolist(),
                                            support.tolist())}

    @property
    def macro_f1(self) -> float:
        """The mean of the classes' F1 (every class counts the same, however many images it has), over
        the classes the split has or the model predicted (scikit-learn's labels=None)."""
        rows = self.per_class([str(i) for i in range(len(self.confusion))]).values()
        present = self.confusion.sum(0) + self.confusion.sum(1) > 0
        scores = [row["f1"] for row, seen in zip(rows, present.tolist()) if seen]
        return sum(scores) / max(len(scores), 1)


@dataclass
class Mistakes:
    """The k most confidently wrong predictions of an evaluation, most confident first."""

    images: torch.Tensor  # (k, 3, H, W) as the model saw them (normalized)
    labels: list[int]
    predicted: list[int]
    confidence: list[float]


class _MistakeTracker:
    """Keeps the k most confident wrong predictions on the device, batch by batch (no host sync)."""

    def __init__(self, k: int):
        self.k, self.conf, self.images, self.labels, self.pred = k, None, None, None, None

    def add(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        conf, pred = logits.float().softmax(1).max(1)
        conf = torch.where(pred != labels, conf, -1.0)  # right answers never qualify
        top = conf.topk(min(self.k, len(conf))).indices
        parts = (conf[top], images[top].float(), labels[top], pred[top])
        if self.conf is not None:
            parts = tuple(torch.cat([a, b]) for a, b in zip((self.conf, self.images, self.labels, self.pred), parts))
        keep = parts[0].topk(min(self.k, len(parts[0]))).indices
        self.conf, self.images, self.labels, self.pred = (t[keep] for t in parts)

    def result(self) -> Mistakes | None:
        if self.conf is None:
            return None
        wrong = (self.conf >= 0).cpu()
        return Mistakes(self.images.cpu()[wrong], self.labels.cpu()[wrong].tolist(), self.pred.cpu()[wrong].tolist(),
                        self.conf.cpu()[wrong].tolist())


def predict_logits(model: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """float32 logits, averaged over test-time augmentations of the batch: `flip` averages the image
    and its mirror; `flip_translate` (airbench's) adds, at half the weight, the mirrored pairs of the
    image shifted by one pixel up-left and down-right (reflected at the border)."""
    if tta == "none":
        return model(images).float()

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(x).float() + model(x.flip(-1)).float())
    logits = mirrored(images)
    if tta == "flip":
        return logits
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:]))
    return 0.5 * logits + 0.5 * shifted


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, precision: Precision, num_classes: int, *,
             mistakes: int = 0, tta: str = "none", desc: str = "eval", progress: bool | None = None) -> EvalResult:
    """Mean loss, accuracy (and top-5 with more than 5 classes) and confusion matrix of `model` on
    every image of `loader`, with test-time augmentation `tta`; and its `mistakes` most
    confidently wrong predictions."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, device=device, dtype=torch.float32)  # loss, top-5 correct (no float64 on MPS)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    tracker = _MistakeTracker(mistakes) if mistakes else None
    images, start = 0, time.perf_counter()
    bar = progress_bar(loader, progress=progress, desc=desc, unit="batch")
    for i, (batch, labels) in enumerate(bar, 1):
        with precision.autocast():
            logits = predict_logits(model, batch, tta)
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        if num_classes > 5:
            sums[1] += (logits.topk(5, 1).indices == labels[:, None]).any(1).sum()
        cells = labels * num_classes + logits.argmax(1)
        confusion.scatter_add_(0, cells, torch.ones_like(cells))  # bincount would sync to size its output
        images += len(labels)
        if tracker is not None:
            tracker.add(batch, logits, labels)
        if not bar.disable and i % 10 == 0:  # a live readout costs a sync: only for a visible bar
            correct = confusion.view(num_classes, num_classes).diag().sum()
            bar.set_postfix({"loss": f"{sums[0].item() / images:.4f}", "acc": f"{correct.item() / images:.2%}",
                             "img/s": f"{images / (time.perf_counter() - start):,.0f}"}, refresh=False)
    if distributed.active():  # every process evaluated its own shard: sum them
        distributed.all_reduce(sums)
        distributed.all_reduce(confusion)
        images = int(distributed.all_reduce(torch.tensor([images], device=device)).item())
    confusion = confusion.view(num_classes, num_classes).cpu()
    loss_sum, top5 = sums.tolist()
    n = max(images, 1)
    return EvalResult(loss_sum / n, int(confusion.diag().sum()) / n, images, time.perf_counter() - start,
                      confusion, tracker.result() if tracker else None, top5 / n if num_classes > 5 else None)
