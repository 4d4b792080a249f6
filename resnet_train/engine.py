"""Training steps: `OptimizerStep`, the one place the weights are updated, and `train_one_epoch`, a
pass of them over a loader. fit.py runs epochs of it, budget.py times it, scripts/sync_check.py
checks it for host syncs; evaluation.py holds the other half (evaluate, TTA, confusion, mistakes).

No Hydra and no files here. Loss and accuracy accumulate on the device and are read (one host
sync) once per `log_every` steps and at the end of an epoch.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed, pause
from .data import Loader
from .device import Precision
from .ema import WeightEMA
from .errors import TrainingDiverged
from .mixing import Mixed, Mixer
from .optim import Scheduler
from .progress import progress_bar

Batch = tuple[torch.Tensor, torch.Tensor]
StepLogger = Callable[[int, float, float], None]  # (global step, mean loss since last call, lr)


@dataclass
class StepSettings:
    """How each optimizer step is made, besides the model, data and optimizer."""

    label_smoothing: float = 0.0
    accumulate: int = 1  # micro-batches per optimizer step (gradients summed, loss / accumulate)
    grad_clip_norm: float | None = None  # clip the global gradient L2 norm (unscaled first under fp16)
    mixer: Mixer | None = None  # MixUp / CutMix
    ema: WeightEMA | None = None  # updated after every optimizer step
    class_weights: torch.Tensor | None = None  # the loss's weight of each class (on the device)


@dataclass
class MicroBatch:
    """What one micro-batch of a step gives the meters: its loss, logits, and the labels accuracy is
    counted against (with MixUp/CutMix, the label with the larger share of each image)."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


class OptimizerStep:
    """One update of the weights from `settings.accumulate` micro-batches. The only place one is
    made -- by training, by the time budget's measurement and by scripts/sync_check.py: zero_grad,
    forward and backward (under DDP without the all-reduce before the last micro-batch), loss
    scaling, unscaling and clipping, the optimizer and grad-scaler step, the schedule, the EMA."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                 precision: Precision, scaler: torch.amp.GradScaler | None = None,
                 settings: StepSettings | None = None):
        self.model, self.optimizer, self.scheduler, self.precision = model, optimizer, scheduler, precision
        self.scaler = scaler if scaler is not None else precision.grad_scaler()
        self.settings = settings or StepSettings()

    def __call__(self, micro_batches: Iterable[Batch]) -> list[MicroBatch]:
        """Train on the next `settings.accumulate` micro-batches of `micro_batches` (consumed one at
        a time, never held together), then step; no host sync."""
        k = self.settings.accumulate
        done = [self._forward_backward(images, labels, first=i == 0, last=i == k - 1)
                for i, (images, labels) in enumerate(itertools.islice(micro_batches, k))]
        self._update()
        return done

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, first: bool, last: bool) -> MicroBatch:
        settings = self.settings
        mixed = settings.mixer(images, labels) if settings.mixer is not None else Mixed(images, labels, labels, 1.0)
        no_sync = getattr(self.model, "no_sync", None)  # (DistributedDataParallel's)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with self.precision.autocast():
                logits = self.model(mixed.images)
                loss = mixed.loss(logits, settings.label_smoothing, settings.class_weights)
            if first:  # (after the forward pass: measured ~5% faster on the CPU than before it; the
                # last step's gradients stay until then, for the gradient histograms)
                self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss / settings.accumulate if settings.accumulate > 1 else loss).backward()
        return MicroBatch(loss, logits, mixed.dominant)

    def _update(self) -> None:
        if self.settings.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
            # (foreach=None: torch picks per device; MPS has no foreach kernels and True would raise there)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip_norm, foreach=None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.settings.ema is not None:
            self.settings.ema.update()

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return self.scheduler.get_last_lr()[0]


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


@dataclass
class EpochHooks:
    """What an epoch does between steps besides training: every `log_every` steps (and at its end)
    `on_log(step, loss, lr)`; every `checkpoint_every` global steps (0: never)
    `on_checkpoint(progress, step)`; after each step, stop if `should_stop()`."""

    log_every: int = 50
    on_log: StepLogger | None = None
    checkpoint_every: int = 0
    on_checkpoint: Callable[[EpochProgress, int], None] | None = None
    should_stop: Callable[[], bool] | None = None


class _Meter:
    """Loss sum, correct count and the first non-finite step, kept on the device; `read` is the only
    host sync. float32, not float64: Apple's MPS has no float64, and an epoch's sums stay exact
    enough (counts exactly up to 16.7M images, loss sums to ~1e-7 relative). Also the window of
    steps since the last log (their learning rates, for a divergence message) and the epoch's clock."""

    def __init__(self, device: torch.device, start: EpochProgress):
        # A resumed epoch's sums are global ones: with several processes only the first carries them.
        carries = distributed.rank() == 0
        sums = [start.loss_sum, start.correct] if carries else [0.0, 0.0]
        self.state = torch.tensor([*sums, -1.0], device=device, dtype=torch.float32)
        self.world = torch.distributed.get_world_size() if distributed.active() else 1
        self.images = start.images // self.world  # this process's images (the same count on every process)
        self.logged_sum, self.logged_images = start.logged_loss_sum, start.logged_images
        self.lrs: dict[int, float] = {}  # the learning rate of each step since the last read
        self.clock = time.perf_counter() - start.seconds

    def add(self, batch: MicroBatch, step: int, lr: float) -> None:
        n = len(batch.labels)
        loss = batch.loss.detach().float()
        self.state[:2] += torch.stack([loss * n, (batch.logits.argmax(1) == batch.labels).sum().float()])
        self.state[2] = torch.where((self.state[2] < 0) & ~loss.isfinite(), step, self.state[2])
        self.images += n
        self.lrs[step] = lr

    def read(self) -> tuple[float, float]:
        """Loss sum and correct count (with several processes, over all of them); TrainingDiverged
        if a step since the last read had a NaN/inf loss."""
        state = self.state
        if distributed.active():
            state = torch.cat([distributed.all_reduce(state[:2].clone()), distributed.all_reduce(state[2:].clone(), "max")])
        loss_sum, correct, bad_step = state.tolist()  # (the one sync)
        if bad_step >= 0:
            raise TrainingDiverged(
                f"the training loss became NaN/inf at step {int(bad_step)} (learning rate "
                f"{self.lrs[int(bad_step)]:.4g}); lower optim.lr or add scheduler.warmup_epochs")
        return loss_sum, correct

    @property
    def total_images(self) -> int:
        return self.images * self.world

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.clock

    def window(self) -> tuple[float, float, float]:
        """Mean loss since the last window, and the epoch's mean loss and accuracy so far; starts a
        new window."""
        loss_sum, correct = self.read()
        images = self.total_images
        window_loss = (loss_sum - self.logged_sum) / (images - self.logged_images)
        self.logged_sum, self.logged_images, self.lrs = loss_sum, images, {}
        return window_loss, loss_sum / images, correct / images

    def progress(self, batches: int) -> EpochProgress:
        """The epoch so far, as a checkpoint keeps it. With several processes every rank's sums
        are the same global ones, so the first process's snapshot serves all on resume."""
        loss_sum, correct = self.read()
        return EpochProgress(batches, loss_sum, correct, self.total_images, self.logged_sum, self.logged_images,
                             self.seconds)


def train_one_epoch(step: OptimizerStep, loader: Loader, *, global_step: int = 0, start: EpochProgress | None = None,
                    hooks: EpochHooks | None = None, desc: str = "train",
                    progress: bool | None = None) -> tuple[EpochResult, int]:
    """One pass over `loader` (from batch `start.step` when resuming mid-epoch); returns the epoch's
    mean loss and accuracy and the new global step (optimizer steps; with accumulation each takes
    `accumulate` batches, and a last incomplete group of batches is left out). When
    `hooks.should_stop()` turns true, TrainingInterrupted is raised after the current step; a NaN
    or infinite loss raises TrainingDiverged naming the step and its learning rate."""
    step.model.train()
    start, hooks, k = start or EpochProgress(), hooks or EpochHooks(), step.settings.accumulate
    meter = _Meter(next(step.model.parameters()).device, start)
    steps = len(loader) // k  # optimizer steps in a whole epoch
    bar = progress_bar(progress=progress, total=steps * k, initial=start.step, desc=desc, unit="batch")
    batches = iter(loader)
    try:
        for i in range(start.step // k + 1, steps + 1):  # (i: this epoch's optimizer steps, from 1)
            global_step += 1
            lr = step.lr
            for micro_batch in step(batches):
                meter.add(micro_batch, global_step, lr)
            bar.update(k)
            pause.point("train_step")
            if i % hooks.log_every == 0 or i == steps:
                window_loss, loss, accuracy = meter.window()
                bar.set_postfix({"loss": f"{loss:.4f}", "acc": f"{accuracy:.2%}", "lr": f"{step.lr:.3g}",
                                 "img/s": f"{meter.total_images / meter.seconds:,.0f}"}, refresh=False)
                if hooks.on_log is not None:
                    hooks.on_log(global_step, window_loss, step.lr)
            if hooks.should_stop is not None and hooks.should_stop():
                raise TrainingInterrupted(meter.progress(i * k), global_step)
            if hooks.checkpoint_every and global_step % hooks.checkpoint_every == 0 and i < steps \
                    and hooks.on_checkpoint:
                hooks.on_checkpoint(meter.progress(i * k), global_step)
    finally:
        bar.close()
    loss_sum, correct = meter.read()
    n = max(meter.total_images, 1)
    return EpochResult(loss_sum / n, correct / n, meter.total_images, meter.seconds), global_step
