"""The training loop: `train_one_epoch`, `evaluate`, and `fit` that runs epochs of both.

No Hydra and no files here: results leave through the `logger` and `checkpoints` objects that
`fit` is given. Loss and accuracy accumulate on the device and are read (one host sync) once per
`log_every` steps and at the end of an epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Data, Loader
from .device import Precision
from .optim import Scheduler


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    images: int
    seconds: float
    confusion: torch.Tensor  # (classes, classes) counts: rows true, columns predicted

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / totals).tolist()


class _Meter:
    """Loss sum, correct count and the first non-finite step, kept on the device; `read` is the only
    host sync."""

    def __init__(self, device: torch.device):
        self.state = torch.tensor([0.0, 0.0, -1.0], device=device, dtype=torch.float64)
        self.images = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        n = len(labels)
        loss = loss.detach().double()
        self.state[:2] += torch.stack([loss * n, (logits.argmax(1) == labels).sum().double()])
        self.state[2] = torch.where((self.state[2] < 0) & ~loss.isfinite(), step, self.state[2])
        self.images += n

    def read(self) -> tuple[float, float, int | None]:
        """Mean loss, accuracy, and the first step whose loss was NaN/inf (None if none)."""
        loss_sum, correct, bad_step = self.state.tolist()
        n = max(self.images, 1)
        return loss_sum / n, correct / n, None if bad_step < 0 else int(bad_step)


StepLogger = Callable[[int, float, float], None]  # (global step, mean loss since last call, lr)


def train_one_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                    precision: Precision, scaler: torch.amp.GradScaler, *, global_step: int = 0,
                    label_smoothing: float = 0.0, log_every: int = 50, on_log: StepLogger | None = None,
                    desc: str = "train", progress: bool | None = None) -> tuple[EpochResult, int]:
    """One pass over `loader`; returns the epoch's mean loss and accuracy and the new global step.
    Raises TrainingDiverged, naming the step and its learning rate, once the loss is NaN or infinite."""
    model.train()
    device = next(model.parameters()).device
    meter, start = _Meter(device), time.perf_counter()
    last_sum, last_images, window_lrs = 0.0, 0, {}
    bar = tqdm(total=len(loader), desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    for i, (images, labels) in enumerate(loader, 1):
        global_step += 1
        window_lrs[global_step] = scheduler.get_last_lr()[0]  # the lr this step uses
        with precision.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        meter.add(loss, logits, labels, global_step)
        bar.update(1)
        if i % log_every == 0 or i == len(loader):
            mean_loss, accuracy, bad_step = meter.read()
            if bad_step is not None:
                raise TrainingDiverged(
                    f"the training loss became NaN/inf at step {bad_step} (learning rate {window_lrs[bad_step]:.4g}); "
                    "lower optim.lr or add scheduler.warmup_epochs")
            loss_sum = mean_loss * meter.images
            window_loss = (loss_sum - last_sum) / (meter.images - last_images)
            lr = scheduler.get_last_lr()[0]
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{accuracy:.2%}", lr=f"{lr:.3g}",
                            img_s=f"{meter.images / elapsed:,.0f}", refresh=False)
            if on_log is not None:
                on_log(global_step, window_loss, lr)
            last_sum, last_images, window_lrs = loss_sum, meter.images, {}
    bar.close()
    mean_loss, accuracy, _ = meter.read()
    return EpochResult(mean_loss, accuracy, meter.images, time.perf_counter() - start), global_step


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, precision: Precision, num_classes: int, *,
             desc: str = "eval", progress: bool | None = None) -> EvalResult:
    """Mean loss, accuracy and confusion matrix of `model` on every image of `loader`."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    images, start = 0, time.perf_counter()
    for batch, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress,
                              dynamic_ncols=True):
        with precision.autocast():
            logits = model(batch)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        cells = labels * num_classes + logits.argmax(1)
        confusion.scatter_add_(0, cells, torch.ones_like(cells))  # bincount would sync to size its output
        images += len(labels)
    confusion = confusion.view(num_classes, num_classes).cpu()
    correct = int(confusion.diag().sum())
    return EvalResult(loss_sum.item() / max(images, 1), correct / max(images, 1), images,
                      time.perf_counter() - start, confusion)


# ------------------------------------------------------------------------------------------
# fit: epochs of train + validate, best/last checkpoints, final test with the best weights
# ------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress of a run: what a checkpoint needs besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one row of metrics per epoch


class RunLogger(Protocol):
    def info(self, message: str) -> None: ...
    def train_step(self, step: int, loss: float, lr: float) -> None: ...
    def epoch(self, epoch: int, row: dict) -> None: ...


class Checkpoints(Protocol):
    def save_last(self, state: TrainState) -> None: ...
    def copy_last_to_best(self) -> None: ...
    def load_model_weights(self, name: str) -> None: ...


def fit(model: nn.Module, data: Data, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
        precision: Precision, scaler: torch.amp.GradScaler, *, epochs: int, state: TrainState,
        logger: RunLogger, checkpoints: Checkpoints, label_smoothing: float = 0.0, log_every: int = 50,
        progress: bool | None = None, on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train from `state.epoch` to `epochs`; return the final metrics (fractions 0..1)."""
    num_classes = len(data.classes)
    for epoch in range(state.epoch + 1, epochs + 1):
        data.train.set_epoch(epoch)
        train, state.global_step = train_one_epoch(
            model, data.train, optimizer, scheduler, precision, scaler, global_step=state.global_step,
            label_smoothing=label_smoothing, log_every=log_every, on_log=logger.train_step,
            desc=f"epoch {epoch}/{epochs} train", progress=progress)
        val = evaluate(model, data.val, precision, num_classes, desc=f"epoch {epoch}/{epochs} val",
                       progress=progress) if data.val is not None else None
        scheduler.end_of_epoch(val.loss if val else None)
        is_best = val is None or val.accuracy > state.best_val_accuracy
        if is_best:
            state.best_val_accuracy, state.best_epoch = (val.accuracy if val else -1.0), epoch
        state.epoch = epoch
        row = {"epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy,
               "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
               "lr": scheduler.get_last_lr()[0], "images_per_second": train.images_per_second,
               "train_seconds": train.seconds, "epoch_seconds": train.seconds + (val.seconds if val else 0.0),
               "is_best": is_best}
        state.history.append(row)
        logger.epoch(epoch, row)
        checkpoints.save_last(state)
        if is_best:
            checkpoints.copy_last_to_best()
        if on_epoch_end is not None:
            on_epoch_end(summarize(state))

    metrics = summarize(state)
    if data.test is not None:
        checkpoints.load_model_weights("best")
        test = evaluate(model, data.test, precision, num_classes, desc="test", progress=progress)
        metrics.update(test_loss=test.loss, test_accuracy=test.accuracy)
        logger.info(f"test (best weights, epoch {state.best_epoch}): loss {test.loss:.4f}  "
                    f"accuracy {test.accuracy:.2%} on {test.images:,} images")
    else:
        logger.info("no test split: skipped the final test evaluation")
    return metrics


def summarize(state: TrainState) -> dict:
    """Metrics of the run so far (the last epoch's, the best epoch, mean throughput); test is filled later."""
    final = state.history[-1] if state.history else {}
    return {
        "epochs": state.epoch,
        "train_loss": final.get("train_loss"), "train_accuracy": final.get("train_accuracy"),
        "val_loss": final.get("val_loss"), "val_accuracy": final.get("val_accuracy"),
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
        "test_loss": None, "test_accuracy": None,
        "images_per_second": _mean_throughput(state.history),
    }


def _mean_throughput(history: list[dict]) -> float | None:
    """Training images/s over the run, leaving out the first epoch (warm-up) when there are more."""
    rows = history[1:] if len(history) > 1 else history
    seconds = sum(r["train_seconds"] for r in rows)
    return sum(r["images_per_second"] * r["train_seconds"] for r in rows) / seconds if seconds else None
