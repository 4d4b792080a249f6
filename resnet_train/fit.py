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
from .engine import EpochProgress, EpochResult, EvalResult, StepSettings, TrainingInterrupted, evaluate, train_one_epoch
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
    stopped_early: int = 0  # the epoch early stopping ended the run at (0: it did not)
    early_best: float | None = None  # early stopping: the best value of its metric so far
    early_bad_epochs: int = 0  # early stopping: epochs since that value

    def finished(self, epochs: int) -> bool:
        return (self.epoch >= epochs or self.stopped_early > 0) and not self.epoch_progress and self.tested


class RunLogger(Protocol):
    def info(self, message: str) -> None: ...
    def train_step(self, step: int, loss: float, lr: float) -> None: ...
    def epoch(self, step: int, row: dict) -> None: ...
    def validation(self, step: int, epoch: int, result: EvalResult, model: nn.Module,
                   grad_scale: float = 1.0) -> None: ...
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


@dataclass(frozen=True)
class EarlyStopping:
    patience: int = 0  # epochs without improvement before stopping (0: never stop early)
    min_epochs: int = 0
    metric: str = "val_accuracy"  # or val_loss
    min_delta: float = 0.0


@dataclass
class Loop:
    """What every epoch of `fit` needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    precision: Precision
    scaler: torch.amp.GradScaler
    logger: RunLogger
    checkpoints: Checkpoints
    step: StepSettings = field(default_factory=StepSettings)
    log_every: int = 50
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] | None = None
    progress: bool | None = None
    mistakes: int = 0  # most confidently wrong test images to keep for the logger
    tta: str = "none"  # test-time augmentation for validation and the test
    ema_selects: bool = True  # with an EMA: it, not the raw weights, picks best.pt and is tested
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)


def fit(model: nn.Module, data: Data, loop: Loop, state: TrainState, epochs: int,
        started_at: float | None = None) -> dict:
    """Train from where `state` stands to `epochs`, then test the best weights (once). Returns the
    final metrics (fractions 0..1)."""
    wall_before, started_at = state.wall_seconds, started_at or time.time()

    def save_last() -> None:
        state.wall_seconds = wall_before + time.time() - started_at  # of every session of this run
        loop.checkpoints.save_last(state)

    loop.checkpoints.repair_best(state)
    if state.epoch < epochs and not state.stopped_early:
        state.tested = False  # (a finished run trained longer is tested again)
    try:
        for epoch in range(state.epoch + 1, epochs + 1):
            if state.stopped_early:
                break
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
    if loop.step.mixer is not None:
        loop.step.mixer.set_epoch(epoch, skip=resume.step if resume else 0)
    try:
        train, state.global_step = train_one_epoch(
            model, data.train, loop.optimizer, loop.scheduler, loop.precision, loop.scaler, loop.step,
            global_step=state.global_step, start=resume, log_every=loop.log_every, on_log=loop.logger.train_step,
            checkpoint_every=loop.checkpoint_every,
            on_checkpoint=save_mid_epoch, should_stop=loop.should_stop, desc=f"epoch {epoch}/{epochs} train",
            progress=loop.progress)
    except TrainingInterrupted as stop:
        save_mid_epoch(stop.progress, stop.global_step)
        raise
    state.epoch_progress = None
    return train


def _end_epoch(model: nn.Module, data: Data, loop: Loop, state: TrainState, epoch: int, epochs: int,
               train: EpochResult, save_last: Callable[[], None]) -> None:
    """Validate (the raw and, with one, the EMA weights), record the epoch, write last.pt and (if it is
    the best so far) best.pt, and decide on early stopping."""
    validate = lambda m, name: evaluate(m, data.val, loop.precision, len(data.classes), tta=loop.tta,  # noqa: E731
                                        desc=f"epoch {epoch}/{epochs} {name}", progress=loop.progress)
    val = validate(model, "val") if data.val is not None else None
    ema = loop.step.ema
    val_ema = validate(ema.module, "val ema") if ema is not None and data.val is not None else None
    pause.point("validation")
    chosen = val_ema if val_ema is not None and loop.ema_selects else val
    loop.scheduler.end_of_epoch(chosen.loss if chosen else None)
    # A non-finite validation loss never makes an epoch the best, whatever its accuracy.
    is_best = chosen is None or (math.isfinite(chosen.loss) and chosen.accuracy > state.best_val_accuracy)
    if is_best:
        state.best_val_accuracy, state.best_epoch = (chosen.accuracy if chosen else -1.0), epoch
    state.epoch = epoch
    if val is not None:
        # fp16: the last step's gradients are loss-scaled unless clipping unscaled them
        scaled = loop.scaler.is_enabled() and not loop.step.grad_clip_norm
        loop.logger.validation(state.global_step, epoch, chosen, model, loop.scaler.get_scale() if scaled else 1.0)
    row = {"epoch": epoch, "step": state.global_step, "train_loss": train.loss, "train_accuracy": train.accuracy,
           **_eval_row("val", val), **(_eval_row("val_ema", val_ema) if ema is not None else {}),
           "train_images": train.images, "lr": loop.scheduler.get_last_lr()[0],
           "images_per_second": train.images_per_second, "train_seconds": train.seconds,
           "epoch_seconds": train.seconds + sum(v.seconds for v in (val, val_ema) if v is not None), "is_best": is_best}
    state.history.append(row)
    _early_stopping(loop.early_stopping, state, chosen, epoch, last=epoch == epochs)
    loop.logger.epoch(state.global_step, row)  # TensorBoard (flushed) and the console line
    save_last()
    if is_best:
        pause.point("best_update")
        loop.checkpoints.copy_last_to_best()
    loop.logger.write_metrics({**summarize(state), "wall_seconds": state.wall_seconds}, state.history)


def _eval_row(name: str, result: EvalResult | None) -> dict:
    return {f"{name}_loss": result.loss if result else None, f"{name}_accuracy": result.accuracy if result else None,
            f"{name}_top5_accuracy": result.top5_accuracy if result else None,
            f"{name}_images": result.images if result else 0}


def _early_stopping(rule: EarlyStopping, state: TrainState, result: EvalResult | None, epoch: int,
                    last: bool = False) -> None:
    """Count the epochs since the metric last improved by more than min_delta; stop after
    `patience` of them (not before min_epochs). The count lives in TrainState: resuming keeps it,
    also after the `last` epoch (which ends the run anyway), should the run be trained longer."""
    if not rule.patience or result is None:
        return
    value = result.accuracy if rule.metric == "val_accuracy" else -result.loss  # higher is better
    if state.early_best is None or value > state.early_best + rule.min_delta:
        state.early_best, state.early_bad_epochs = value, 0
    else:
        state.early_bad_epochs += 1
    if state.early_bad_epochs >= rule.patience and epoch >= rule.min_epochs and not last:
        state.stopped_early = epoch


def _final_test(model: nn.Module, data: Data, loop: Loop, state: TrainState) -> None:
    """Test the best weights, record the results (TensorBoard at the step after training, so a
    resume that repeats this phase replaces them), then mark the run finished in last.pt."""
    step = state.global_step + 1
    if state.stopped_early:
        loop.logger.info(f"early stopping: no improvement of {loop.early_stopping.metric} for "
                         f"{loop.early_stopping.patience} epochs; stopped after epoch {state.stopped_early}")
    if data.test is None:
        loop.logger.info("no test split: skipped the final test evaluation")
    elif state.best_epoch == 0:
        loop.logger.info("no epoch had a finite validation loss: there are no best weights to test")
    else:
        loop.checkpoints.load_model_weights("best")
        test = evaluate(model, data.test, loop.precision, len(data.classes), mistakes=loop.mistakes, tta=loop.tta,
                        desc="test", progress=loop.progress)
        pause.point("final_test")
        state.test = {"test_loss": test.loss, "test_accuracy": test.accuracy, "test_images": test.images,
                      "test_top5_accuracy": test.top5_accuracy}
        loop.logger.test(step, test)
        which = "best EMA weights" if loop.step.ema is not None and loop.ema_selects else "best weights"
        loop.logger.info(f"test ({which}, epoch {state.best_epoch}): loss {test.loss:.4f}  accuracy "
                         f"{test.accuracy:.2%}" + (f"  top-5 {test.top5_accuracy:.2%}" if test.top5_accuracy else "")
                         + f" on {test.images:,} images")
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
        "test_loss": None, "test_accuracy": None, "test_images": None, "test_top5_accuracy": None,
        "val_top5_accuracy": final.get("val_top5_accuracy"), "val_ema_accuracy": final.get("val_ema_accuracy"),
        "stopped_early": state.stopped_early or None,
        "images_per_second": _mean_throughput(state.history),
    }


def _mean_throughput(history: list[dict]) -> float | None:
    """Training images/s over the run, leaving out the first epoch (warm-up) when there are more."""
    rows = history[1:] if len(history) > 1 else history
    seconds = sum(r["train_seconds"] for r in rows)
    return sum(r["images_per_second"] * r["train_seconds"] for r in rows) / seconds if seconds else None
