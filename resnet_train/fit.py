"""A whole run: epochs of train + validate, last/best checkpoints, then the final test as a phase.

`fit` starts wherever `TrainState` stands -- a fresh run, an epoch end, the middle of an epoch, or
all epochs done but the final test not yet recorded -- so a run killed at any moment is finished
by resuming it. Results leave through the `logger` and `checkpoints` objects it is given.

The order of writes is what makes every kill point safe: TensorBoard is flushed before each
checkpoint (a resume hides later steps), last.pt is written before best.pt is updated (a resume
repairs a best.pt that missed its update), and the run is marked finished in last.pt only after
the test results are in metrics.json and TensorBoard.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from . import pause
from .data import Data
from .device import Precision
from .engine import EpochProgress, EpochResult, EvalResult, TrainingInterrupted, evaluate, train_one_epoch
from .errors import TrainingDiverged
from .optim import Scheduler


@dataclass
class TrainState:
    """Progress of a run: what a checkpoint needs besides the model, optimizer and RNG states."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    wall_seconds: float = 0.0  # of every session of this run, up to the last checkpoint
    epoch_progress: dict | None = None  # EpochProgress of an unfinished epoch (mid-epoch checkpoint)
    history: list[dict] = field(default_factory=list)  # one row of metrics per epoch
    tested: bool = False  # the final test is recorded: the run is finished
    test: dict | None = None  # test_loss, test_accuracy, test_images of the final test

    def finished(self, epochs: int) -> bool:
        return self.epoch >= epochs and not self.epoch_progress and self.tested


class RunLogger(Protocol):
    def info(self, message: str) -> None: ...
    def train_step(self, step: int, loss: float, lr: float) -> None: ...
    def epoch(self, step: int, row: dict) -> None: ...
    def validation(self, step: int, epoch: int, result: EvalResult, model: nn.Module) -> None: ...
    def test(self, step: int, result: EvalResult) -> None: ...
    def write_metrics(self, metrics: dict, history: list[dict]) -> None: ...
    def finish(self, metrics: dict, history: list[dict], step: int) -> None: ...
    def flush(self) -> None: ...


class Checkpoints(Protocol):
    def save_last(self, state: TrainState) -> None: ...
    def copy_last_to_best(self) -> None: ...
    def repair_best(self, state: TrainState) -> None: ...
    def mark_finished(self, state: TrainState) -> None: ...
    def load_model_weights(self, name: str) -> None: ...
    def last_good(self) -> str: ...


@dataclass
class Loop:
    """What every epoch of `fit` needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    precision: Precision
    scaler: torch.amp.GradScaler
    logger: RunLogger
    checkpoints: Checkpoints
    label_smoothing: float = 0.0
    log_every: int = 50
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] | None = None
    progress: bool | None = None
    mistakes: int = 0  # most confidently wrong test images to keep for the logger


def fit(model: nn.Module, data: Data, loop: Loop, state: TrainState, epochs: int,
        started_at: float | None = None) -> dict:
    """Train from where `state` stands to `epochs`, then test the best weights (once). Returns the
    final metrics (fractions 0..1)."""
    wall_before, started_at = state.wall_seconds, started_at or time.time()

    def save_last() -> None:
        state.wall_seconds = wall_before + time.time() - started_at  # of every session of this run
        loop.checkpoints.save_last(state)

    loop.checkpoints.repair_best(state)
    if state.epoch < epochs:
        state.tested = False  # (a finished run trained longer is tested again)
    try:
        for epoch in range(state.epoch + 1, epochs + 1):
            train = _train_epoch(model, data, loop, state, epoch, epochs, save_last)
            _end_epoch(model, data, loop, state, epoch, epochs, train, save_last)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; {loop.checkpoints.last_good()}") from None
    if not state.tested:
        state.wall_seconds = wall_before + time.time() - started_at
        _final_test(model, data, loop, state)
    return {**summarize(state), **(state.test or {}), "wall_seconds": wall_before + time.time() - started_at}


def _train_epoch(model: nn.Module, data: Data, loop: Loop, state: TrainState, epoch: int, epochs: int,
                 save_last: Callable[[], None]) -> EpochResult:
    def save_mid_epoch(progress: EpochProgress, global_step: int) -> None:
        state.global_step, state.epoch_progress = global_step, asdict(progress)
        loop.logger.flush()
        save_last()

    resume = EpochProgress(**state.epoch_progress) if state.epoch_progress else None
    data.train.set_epoch(epoch, skip=resume.step if resume else 0)
    try:
        train, state.global_step = train_one_epoch(
            model, data.train, loop.optimizer, loop.scheduler, loop.precision, loop.scaler,
            global_step=state.global_step, start=resume, label_smoothing=loop.label_smoothing,
            log_every=loop.log_every, on_log=loop.logger.train_step, checkpoint_every=loop.checkpoint_every,
            on_checkpoint=save_mid_epoch, should_stop=loop.should_stop, desc=f"epoch {epoch}/{epochs} train",
            progress=loop.progress)
    except TrainingInterrupted as stop:
        save_mid_epoch(stop.progress, stop.global_step)
        raise
    state.epoch_progress = None
    return train


def _end_epoch(model: nn.Module, data: Data, loop: Loop, state: TrainState, epoch: int, epochs: int,
               train: EpochResult, save_last: Callable[[], None]) -> None:
    """Validate, record the epoch, write last.pt and (if it is the best so far) best.pt."""
    val = evaluate(model, data.val, loop.precision, len(data.classes), desc=f"epoch {epoch}/{epochs} val",
                   progress=loop.progress) if data.val is not None else None
    pause.point("validation")
    loop.scheduler.end_of_epoch(val.loss if val else None)
    # A non-finite validation loss never makes an epoch the best, whatever its accuracy.
    is_best = val is None or (math.isfinite(val.loss) and val.accuracy > state.best_val_accuracy)
    if is_best:
        state.best_val_accuracy, state.best_epoch = (val.accuracy if val else -1.0), epoch
    state.epoch = epoch
    if val is not None:
        loop.logger.validation(state.global_step, epoch, val, model)
    row = {"epoch": epoch, "step": state.global_step, "train_loss": train.loss, "train_accuracy": train.accuracy,
           "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
           "val_images": val.images if val else 0, "train_images": train.images,
           "lr": loop.scheduler.get_last_lr()[0], "images_per_second": train.images_per_second,
           "train_seconds": train.seconds, "epoch_seconds": train.seconds + (val.seconds if val else 0.0),
           "is_best": is_best}
    state.history.append(row)
    loop.logger.epoch(state.global_step, row)  # TensorBoard (flushed) and the console line
    save_last()
    if is_best:
        pause.point("best_update")
        loop.checkpoints.copy_last_to_best()
    loop.logger.write_metrics({**summarize(state), "wall_seconds": state.wall_seconds}, state.history)


def _final_test(model: nn.Module, data: Data, loop: Loop, state: TrainState) -> None:
    """Test the best weights, record the results (TensorBoard at the step after training, so a
    resume that repeats this phase replaces them), then mark the run finished in last.pt."""
    step = state.global_step + 1
    if data.test is None:
        loop.logger.info("no test split: skipped the final test evaluation")
    elif state.best_epoch == 0:
        loop.logger.info("no epoch had a finite validation loss: there are no best weights to test")
    else:
        loop.checkpoints.load_model_weights("best")
        test = evaluate(model, data.test, loop.precision, len(data.classes), mistakes=loop.mistakes, desc="test",
                        progress=loop.progress)
        pause.point("final_test")
        state.test = {"test_loss": test.loss, "test_accuracy": test.accuracy, "test_images": test.images}
        loop.logger.test(step, test)
        loop.logger.info(f"test (best weights, epoch {state.best_epoch}): loss {test.loss:.4f}  "
                         f"accuracy {test.accuracy:.2%} on {test.images:,} images")
    state.tested = True
    loop.logger.finish({**summarize(state), **(state.test or {}), "wall_seconds": state.wall_seconds},
                       state.history, step)
    loop.checkpoints.mark_finished(state)


def summarize(state: TrainState) -> dict:
    """Metrics of the run so far (the last epoch's, the best epoch, mean throughput); test is filled later."""
    final = state.history[-1] if state.history else {}
    return {
        "epochs": state.epoch,
        "train_loss": final.get("train_loss"), "train_accuracy": final.get("train_accuracy"),
        "val_loss": final.get("val_loss"), "val_accuracy": final.get("val_accuracy"),
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
        "test_loss": None, "test_accuracy": None, "test_images": None,
        "images_per_second": _mean_throughput(state.history),
    }


def _mean_throughput(history: list[dict]) -> float | None:
    """Training images/s over the run, leaving out the first epoch (warm-up) when there are more."""
    rows = history[1:] if len(history) > 1 else history
    seconds = sum(r["train_seconds"] for r in rows)
    return sum(r["images_per_second"] * r["train_seconds"] for r in rows) / seconds if seconds else None
