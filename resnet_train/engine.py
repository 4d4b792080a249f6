"""The steps of training: `train_one_epoch` and `evaluate` (fit.py runs epochs of them).

No Hydra and no files here. Loss and accuracy accumulate on the device and are read (one host
sync) once per `log_every` steps and at the end of an epoch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed, pause
from .data import Loader
from .device import Precision
from .ema import WeightEMA
from .errors import TrainingDiverged
from .mixing import Mixed, Mixer
from .optim import Scheduler


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
    mistakes: Mistakes | None = None  # the most confident wrong predictions, when asked for
    top5_accuracy: float | None = None  # with more than 5 classes

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / totals).tolist()


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


@dataclass
class EpochProgress:
    """Where training stands inside an epoch: what a mid-epoch checkpoint adds to TrainState."""

    step: int = 0  # batches done in this epoch
    loss_sum: float = 0.0  # summed over those batches' images
    correct: float = 0.0
    images: int = 0  # over all processes (a resume may run on another number of them)
    logged_loss_sum: float = 0.0  # loss_sum and images at the last step log (for the windowed loss)
    logged_images: int = 0
    seconds: float = 0.0  # training time spent in this epoch so far


class TrainingInterrupted(Exception):
    """`should_stop` asked for a stop; raised at the next step boundary with the epoch's progress."""

    def __init__(self, progress: EpochProgress, global_step: int):
        super().__init__(f"stopped after step {global_step}")
        self.progress, self.global_step = progress, global_step


class _Meter:
    """Loss sum, correct count and the first non-finite step, kept on the device; `read` is the only
    host sync. float32, not float64: Apple's MPS has no float64, and an epoch's sums stay exact
    enough (counts exactly up to 16.7M images, loss sums to ~1e-7 relative)."""

    def __init__(self, device: torch.device, start: EpochProgress):
        # A resumed epoch's sums are global ones: with several processes only the first carries them.
        carries = not distributed.active() or torch.distributed.get_rank() == 0
        sums = [start.loss_sum, start.correct] if carries else [0.0, 0.0]
        self.state = torch.tensor([*sums, -1.0], device=device, dtype=torch.float32)
        world = torch.distributed.get_world_size() if distributed.active() else 1
        self.images = start.images // world  # this process's images (the same count on every process)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        n = len(labels)
        loss = loss.detach().float()
        self.state[:2] += torch.stack([loss * n, (logits.argmax(1) == labels).sum().float()])
        self.state[2] = torch.where((self.state[2] < 0) & ~loss.isfinite(), step, self.state[2])
        self.images += n

    def read(self) -> tuple[float, float, int | None]:
        """Loss sum, correct count, and the first step whose loss was NaN/inf (None if none); with
        several processes, over all of them (`images` then counts every process's images too)."""
        if not distributed.active():
            loss_sum, correct, bad_step = self.state.tolist()
            return loss_sum, correct, None if bad_step < 0 else int(bad_step)
        sums = distributed.all_reduce(self.state[:2].clone())
        bad = distributed.all_reduce(self.state[2:].clone(), "max")
        (loss_sum, correct), (bad_step,) = sums.tolist(), bad.tolist()
        return loss_sum, correct, None if bad_step < 0 else int(bad_step)

    @property
    def total_images(self) -> int:
        return self.images * (torch.distributed.get_world_size() if distributed.active() else 1)


StepLogger = Callable[[int, float, float], None]  # (global step, mean loss since last call, lr)


@dataclass
class StepSettings:
    """How each optimizer step is made, besides the model, data and optimizer."""

    label_smoothing: float = 0.0
    accumulate: int = 1  # micro-batches per optimizer step (gradients summed, loss / accumulate)
    grad_clip_norm: float | None = None  # clip the global gradient L2 norm (unscaled first under fp16)
    mixer: Mixer | None = None  # MixUp / CutMix
    ema: WeightEMA | None = None  # updated after every optimizer step


def train_one_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                    precision: Precision, scaler: torch.amp.GradScaler, settings: StepSettings = StepSettings(), *,
                    global_step: int = 0, start: EpochProgress | None = None, log_every: int = 50,
                    on_log: StepLogger | None = None, checkpoint_every: int = 0,
                    on_checkpoint: Callable[[EpochProgress, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, desc: str = "train",
                    progress: bool | None = None) -> tuple[EpochResult, int]:
    """One pass over `loader` (from batch `start.step` when resuming mid-epoch); returns the epoch's
    mean loss and accuracy and the new global step (optimizer steps; with accumulation each takes
    `settings.accumulate` batches, and a last incomplete group of batches is left out).

    Every `checkpoint_every` global steps `on_checkpoint(progress, global_step)` is called; when
    `should_stop()` turns true, TrainingInterrupted is raised after the current step. A NaN or
    infinite loss raises TrainingDiverged naming the step and its learning rate."""
    model.train()
    device = next(model.parameters()).device
    start, k = start or EpochProgress(), settings.accumulate
    usable = len(loader) // k * k
    meter, clock = _Meter(device, start), time.perf_counter() - start.seconds
    logged_sum, logged_images, window_lrs = start.logged_loss_sum, start.logged_images, {}

    def read_finite() -> tuple[float, float]:
        """Sync with the device once; stop here if any step since the last read was non-finite."""
        loss_sum, correct, bad_step = meter.read()
        if bad_step is not None:
            raise TrainingDiverged(
                f"the training loss became NaN/inf at step {bad_step} (learning rate {window_lrs[bad_step]:.4g}); "
                "lower optim.lr or add scheduler.warmup_epochs")
        return loss_sum, correct

    def snapshot(step: int) -> EpochProgress:
        """The epoch so far, as a checkpoint keeps it. With several processes every rank's sums
        are the same global ones, so the first process's snapshot serves all on resume."""
        loss_sum, correct = read_finite()
        return EpochProgress(step, loss_sum, correct, meter.total_images, logged_sum, logged_images,
                             time.perf_counter() - clock)

    bar = tqdm(total=usable, initial=start.step, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        for i, (images, labels) in enumerate(loader, start.step + 1):
            if i > usable:
                break
            window_lrs[global_step + 1] = scheduler.get_last_lr()[0]  # the lr this optimizer step uses
            loss, logits, labels = _forward_backward(model, images, labels, precision, scaler, settings,
                                                     synchronize=i % k == 0,
                                                     zero_grad=optimizer if (i - 1) % k == 0 else None)
            meter.add(loss, logits, labels, global_step + 1)
            bar.update(1)
            if i % k:
                continue
            global_step += 1
            _optimizer_step(model, optimizer, scheduler, scaler, settings)
            pause.point("train_step")
            if (i // k) % log_every == 0 or i == usable:
                loss_sum, correct = read_finite()
                images_so_far = meter.total_images
                window_loss = (loss_sum - logged_sum) / (images_so_far - logged_images)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix({"loss": f"{loss_sum / images_so_far:.4f}", "acc": f"{correct / images_so_far:.2%}",
                                 "lr": f"{lr:.3g}", "img/s": f"{images_so_far / (time.perf_counter() - clock):,.0f}"},
                                refresh=False)
                if on_log is not None:
                    on_log(global_step, window_loss, lr)
                logged_sum, logged_images, window_lrs = loss_sum, images_so_far, {}
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(snapshot(i), global_step)
            if checkpoint_every and global_step % checkpoint_every == 0 and i < usable and on_checkpoint:
                on_checkpoint(snapshot(i), global_step)
    finally:
        bar.close()
    loss_sum, correct, _ = meter.read()
    n = max(meter.total_images, 1)
    return EpochResult(loss_sum / n, correct / n, meter.total_images, time.perf_counter() - clock), global_step


def _forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: Precision,
                      scaler: torch.amp.GradScaler, settings: StepSettings, synchronize: bool = True,
                      zero_grad: torch.optim.Optimizer | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients of one (micro-)batch; the labels accuracy counts against. `zero_grad`: the
    optimizer whose gradients to clear first (the first micro-batch of a step: the last step's stay
    until then, for the gradient histograms). Under DDP the gradients are all-reduced only with the
    last micro-batch of an optimizer step."""
    mixed = settings.mixer(images, labels) if settings.mixer is not None else Mixed(images, labels, labels, 1.0)
    no_sync = getattr(model, "no_sync", None)
    with no_sync() if no_sync is not None and not synchronize else contextlib.nullcontext():
        with precision.autocast():
            logits = model(mixed.images)
            loss = mixed.loss(logits, settings.label_smoothing)
        if zero_grad is not None:  # (after the forward pass: measured ~5% faster on the CPU than before it)
            zero_grad.zero_grad(set_to_none=True)
        scaler.scale(loss / settings.accumulate if settings.accumulate > 1 else loss).backward()
    return loss, logits, mixed.dominant


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                    scaler: torch.amp.GradScaler, settings: StepSettings) -> None:
    if settings.grad_clip_norm:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        # (foreach=None: torch picks per device; MPS has no foreach kernels and True would raise there)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm, foreach=None)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if settings.ema is not None:
        settings.ema.update()


TTA = ("none", "flip", "flip_translate")


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
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
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
