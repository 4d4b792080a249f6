"""time_budget with epochs=auto: as many epochs as fit in the time a user has.

Before training, a copy of the model takes a few real steps (data, augmentation, mixing, EMA and
optimizer included) and evaluates a few validation batches (with the run's TTA, and twice with an
EMA); the number of epochs is then chosen so that setup so far, every epoch's training and
validation, and the final test fit in the budget. The choice is stored in the run's config
(`epochs`), so the schedule is planned over it from the first step and a resumed run is exact.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .data import Data, Loader
from .device import Precision, synchronize
from .engine import OptimizerStep
from .evaluation import evaluate

SAFETY = 0.03  # keep this share of the budget free: checkpoints, logging, timing noise


@dataclass
class Timing:
    step_seconds: float  # one optimizer step, including loading and augmenting its batches
    steps_per_epoch: int
    val_seconds: float  # one epoch's validation (raw and EMA weights, with TTA)
    test_seconds: float  # the final test
    save_seconds: float = 0.0  # one epoch's checkpoint writes (last.pt, and best.pt)

    @property
    def epoch_seconds(self) -> float:
        return self.step_seconds * self.steps_per_epoch + self.val_seconds + self.save_seconds


def epochs_within(budget: float, elapsed: float, timing: Timing, safety: float = SAFETY) -> int:
    """The most epochs whose training, validation and final test fit in what is left of `budget`
    seconds after `elapsed`; at least one."""
    left = budget * (1 - safety) - elapsed - timing.test_seconds
    return max(1, math.floor(left / timing.epoch_seconds))


def measure(step: OptimizerStep, eval_model: torch.nn.Module, data: Data, tta: str, steps: int = 12,
            warmup: int = 4) -> Timing:
    """Time `steps` optimizer steps (after `warmup` untimed ones) of `step` -- the run's step made on
    a copy of its model (`eval_model`, wrapped as the run wraps its own: under DDP the steps include
    the all-reduce) -- and a few validation batches: the run itself is not touched."""
    k, device = step.settings.accumulate, next(eval_model.parameters()).device
    if step.settings.mixer is not None:
        step.settings.mixer.set_epoch(0)
    data.train.set_epoch(0)  # (epoch 0 is never trained: drawing from it changes nothing)
    batches = _endless(data.train)
    step.model.train()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        step(batches)
    synchronize(device)
    step_seconds = (time.perf_counter() - start) / steps
    per_image = _eval_seconds_per_image(eval_model, data.val or data.test, step.precision, len(data.classes), tta)
    evaluations = 2 if step.settings.ema is not None else 1
    val_images = data.val.num_images if data.val is not None else 0
    test_images = data.test.num_images if data.test is not None else 0
    return Timing(step_seconds, len(data.train) // k, per_image * val_images * evaluations, per_image * test_images,
                  2 * _save_seconds(step))


def _endless(loader: Loader) -> Iterator:
    """The loader's batches again and again (itertools.cycle would keep every batch it has seen)."""
    while True:
        yield from loader


def _save_seconds(step: OptimizerStep) -> float:
    """Serializing what a checkpoint holds (written twice an epoch when it is the best: last.pt, best.pt)."""
    start = time.perf_counter()
    ema = step.settings.ema
    state = {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
             "ema": ema.state_dict() if ema is not None else None}
    torch.save(state, io.BytesIO())
    return time.perf_counter() - start


def _eval_seconds_per_image(model: torch.nn.Module, loader: Loader | None, precision: Precision, num_classes: int,
                            tta: str, batches: int = 3) -> float:
    if loader is None:
        return 0.0
    sample = list(itertools.islice(iter(loader), batches + 1))
    evaluate(model, sample[:1], precision, num_classes, tta=tta, progress=False)  # warm-up
    result = evaluate(model, sample[1:] or sample, precision, num_classes, tta=tta, progress=False)
    return result.seconds / max(result.images, 1)


def planned_seconds(elapsed: float, timing: Timing, epochs: int) -> float:
    return elapsed + epochs * timing.epoch_seconds + timing.test_seconds


def describe(budget: float, elapsed: float, timing: Timing, epochs: int) -> str:
    planned = planned_seconds(elapsed, timing, epochs)
    return (f"time_budget={duration_text(budget)}: {timing.step_seconds:.3f}s per step ({timing.steps_per_epoch} an "
            f"epoch), {timing.val_seconds:.1f}s per validation, {elapsed:.0f}s of setup -> {epochs} epochs "
            f"(planned {duration_text(planned)})")


def duration_text(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min"
