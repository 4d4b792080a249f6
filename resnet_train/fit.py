"""A whole run: epochs of train + validate, last/best checkpoints, then the final test as a phase.

`Fit.run` starts wherever `TrainState` stands -- a fresh run, an epoch end, the middle of an epoch, or
all epochs done but the final test not yet recorded -- so a run killed at any moment is finished
by resuming it. Results leave through the `reporter` and `checkpoints` objects it is given.

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

from torch import nn

from . import distributed, pause
from .data import Data
from .engine import EpochHooks, EpochProgress, EpochResult, OptimizerStep, TrainingInterrupted, train_one_epoch
from .errors import TrainingDiverged
from .evaluation import EvalResult, evaluate
from .run_state import EarlyStopping, TrainState


class Reporter(Protocol):
    """Where results go (reporting.RunReporter: the console, TensorBoard, metrics.json)."""

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
    """last.pt and best.pt of the run (checkpoint.RunCheckpoints)."""

    def save_last(self, state: TrainState) -> None: ...
    def copy_last_to_best(self) -> None: ...
    def repair_best(self, state: TrainState) -> None: ...
    def mark_finished(self, state: TrainState) -> None: ...
    def load_model_weights(self, name: str) -> None: ...
    def last_good(self) -> str: ...


@dataclass(frozen=True)
class Cadence:
    """How often a run reports and saves inside an epoch, whether it shows progress bars, and the
    check after every step that asks it to stop (a signal)."""

    log_every: int = 50
    checkpoint_every: int = 0  # also save last.pt every N steps (0: at epoch ends only)
    should_stop: Callable[[], bool] | None = None
    progress: bool | None = None  # progress bars (None: when writing to a terminal)


@dataclass(frozen=True)
class EvalSettings:
    """How epochs are validated and the run is tested."""

    tta: str = "none"  # test-time augmentation for validation and the test
    mistakes: int = 0  # most confidently wrong test images to keep for the reporter
    ema_selects: bool = True  # with an EMA: it, not the raw weights, picks best.pt and is tested
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)


class Fit:
    """The phases of one run over `data` with `step` (its model, optimizer, schedule, EMA), results
    leaving through `reporter` and `checkpoints`."""

    def __init__(self, step: OptimizerStep, data: Data, reporter: Reporter, checkpoints: Checkpoints,
                 cadence: Cadence | None = None, evaluation: EvalSettings | None = None):
        self.step, self.data, self.reporter, self.checkpoints = step, data, reporter, checkpoints
        self.cadence, self.evaluation = cadence or Cadence(), evaluation or EvalSettings()
        self.wall_before, self.started_at = 0.0, time.time()
        self._evaluated: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        return self.step.model

    def _for_evaluation(self, model: nn.Module) -> nn.Module:
        """`model` (the step's or the EMA's) as validation and the test run it: every process with
        the first one's BatchNorm statistics, each on its own shard without DDP's collectives."""
        if model is self.model:
            if self._evaluated is None:
                self._evaluated = distributed.without_ddp(model)
            model = self._evaluated
        distributed.broadcast_tensors(model.buffers())  # (each process's last training forward updated its own)
        return model

    def run(self, state: TrainState, epochs: int, started_at: float | None = None) -> dict:
        """Train from where `state` stands to `epochs`, then test the best weights (once). Returns the
        final metrics (fractions 0..1)."""
        self.wall_before, self.started_at = state.wall_seconds, started_at or time.time()
        self.checkpoints.repair_best(state)
        if state.epoch < epochs and not state.stopped_early:
            state.tested = False  # (a finished run trained longer is tested again)
        try:
            for epoch in range(state.epoch + 1, epochs + 1):
                if state.stopped_early:
                    break
                train = self._train_epoch(state, epoch, epochs)
                self._end_epoch(state, epoch, epochs, train)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; {self.checkpoints.last_good()}") from None
        if not state.tested:
            state.wall_seconds = self._wall_seconds()
            self._final_test(state)
        return {**metrics_so_far(state), **(state.test or {}), "wall_seconds": self._wall_seconds()}

    def _wall_seconds(self) -> float:
        """Of every session of this run."""
        return self.wall_before + time.time() - self.started_at

    def _save_last(self, state: TrainState) -> None:
        state.wall_seconds = self._wall_seconds()
        self.checkpoints.save_last(state)

    def _train_epoch(self, state: TrainState, epoch: int, epochs: int) -> EpochResult:
        def save_mid_epoch(progress: EpochProgress, global_step: int) -> None:
            state.global_step, state.epoch_progress = global_step, asdict(progress)
            self.reporter.flush()
            self._save_last(state)

        resume = EpochProgress(**state.epoch_progress) if state.epoch_progress else None
        skip = resume.step if resume else 0
        self.data.train.set_epoch(epoch, skip=skip)
        if self.step.settings.mixer is not None:
            self.step.settings.mixer.set_epoch(epoch, skip=skip)
        cadence = self.cadence
        hooks = EpochHooks(cadence.log_every, self.reporter.train_step, cadence.checkpoint_every, save_mid_epoch,
                           cadence.should_stop)
        try:
            train, state.global_step = train_one_epoch(self.step, self.data.train, global_step=state.global_step,
                                                       start=resume, hooks=hooks, desc=f"epoch {epoch}/{epochs} train",
                                                       progress=cadence.progress)
        except TrainingInterrupted as stop:
            save_mid_epoch(stop.progress, stop.global_step)
            raise
        state.epoch_progress = None
        return train

    def _validate(self, model: nn.Module, desc: str) -> EvalResult:
        return evaluate(self._for_evaluation(model), self.data.val, self.step.precision, len(self.data.classes),
                        tta=self.evaluation.tta, desc=desc, progress=self.cadence.progress)

    def _end_epoch(self, state: TrainState, epoch: int, epochs: int, train: EpochResult) -> None:
        """Validate (the raw and, with one, the EMA weights), record the epoch, write last.pt and (if
        it is the best so far) best.pt, and decide on early stopping."""
        has_val, ema = self.data.val is not None, self.step.settings.ema
        val = self._validate(self.model, f"epoch {epoch}/{epochs} val") if has_val else None
        val_ema = self._validate(ema.module, f"epoch {epoch}/{epochs} val ema") if has_val and ema else None
        pause.point("validation")
        chosen = val_ema if val_ema is not None and self.evaluation.ema_selects else val
        self.step.scheduler.end_of_epoch(chosen.loss if chosen else None)
        # A non-finite validation loss never makes an epoch the best, whatever its accuracy.
        is_best = chosen is None or (math.isfinite(chosen.loss) and chosen.accuracy > state.best_val_accuracy)
        if is_best:
            state.best_val_accuracy, state.best_epoch = (chosen.accuracy if chosen else -1.0), epoch
        state.epoch = epoch
        if val is not None:
            # fp16: the last step's gradients are loss-scaled unless clipping unscaled them
            scaler = self.step.scaler
            scaled = scaler.is_enabled() and not self.step.settings.grad_clip_norm
            self.reporter.validation(state.global_step, epoch, chosen, self.model, scaler.get_scale() if scaled else 1.0)
        row = self._epoch_row(state, epoch, train, val, val_ema, is_best)
        state.history.append(row)
        if chosen is not None:  # (the last epoch is counted too, should the run be trained longer)
            rule = self.evaluation.early_stopping
            rule.record(state, chosen.accuracy, chosen.loss)
            if rule.ends_after(state, epoch) and epoch < epochs:
                state.stopped_early = epoch
        self.reporter.epoch(state.global_step, row)  # TensorBoard (flushed) and the console line
        self._save_last(state)
        if is_best:
            pause.point("best_update")
            self.checkpoints.copy_last_to_best()
        self.reporter.write_metrics({**metrics_so_far(state), "wall_seconds": state.wall_seconds}, state.history)

    def _epoch_row(self, state: TrainState, epoch: int, train: EpochResult, val: EvalResult | None,
                   val_ema: EvalResult | None, is_best: bool) -> dict:
        """The epoch's line of metrics.json's history."""
        return {"epoch": epoch, "step": state.global_step, "train_loss": train.loss, "train_accuracy": train.accuracy,
                **_eval_row("val", val), **(_eval_row("val_ema", val_ema) if self.step.settings.ema else {}),
                "train_images": train.images, "lr": self.step.lr, "images_per_second": train.images_per_second,
                "train_seconds": train.seconds,
                "epoch_seconds": train.seconds + sum(v.seconds for v in (val, val_ema) if v is not None),
                "is_best": is_best}

    def _final_test(self, state: TrainState) -> None:
        """Test the best weights, record the results (TensorBoard at the step after training, so a
        resume that repeats this phase replaces them), then mark the run finished in last.pt."""
        step, settings = state.global_step + 1, self.evaluation
        if state.stopped_early:
            self.reporter.info(f"early stopping: no improvement of {settings.early_stopping.metric} for "
                               f"{settings.early_stopping.patience} epochs; stopped after epoch {state.stopped_early}")
        if self.data.test is None:
            self.reporter.info("no test split: skipped the final test evaluation")
        elif state.best_epoch == 0:
            self.reporter.info("no epoch had a finite validation loss: there are no best weights to test")
        else:
            self.checkpoints.load_model_weights("best")
            test = evaluate(self._for_evaluation(self.model), self.data.test, self.step.precision,
                            len(self.data.classes), mistakes=settings.mistakes, tta=settings.tta, desc="test",
                            progress=self.cadence.progress)
            pause.point("final_test")
            state.test = {"test_loss": test.loss, "test_accuracy": test.accuracy, "test_images": test.images,
                          "test_top5_accuracy": test.top5_accuracy, "test_macro_f1": test.macro_f1,
                          "test_per_class": test.per_class(self.data.classes)}
            self.reporter.test(step, test)
            which = "best EMA weights" if self.step.settings.ema is not None and settings.ema_selects else "best weights"
            self.reporter.info(f"test ({which}, epoch {state.best_epoch}): loss {test.loss:.4f}  accuracy "
                               f"{test.accuracy:.2%}" + (f"  top-5 {test.top5_accuracy:.2%}" if test.top5_accuracy
                                                          else "") + f" on {test.images:,} images")
        state.tested = True
        self.reporter.finish({**metrics_so_far(state), **(state.test or {}), "wall_seconds": state.wall_seconds},
                             state.history, step)
        self.checkpoints.mark_finished(state)


def _eval_row(name: str, result: EvalResult | None) -> dict:
    return {f"{name}_loss": result.loss if result else None, f"{name}_accuracy": result.accuracy if result else None,
            f"{name}_top5_accuracy": result.top5_accuracy if result else None,
            f"{name}_images": result.images if result else 0}


def metrics_so_far(state: TrainState) -> dict:
    """Metrics of the run so far (the last epoch's, the best epoch, mean throughput); test is filled later."""
    final = state.history[-1] if state.history else {}
    return {
        "epochs": state.epoch,
        "train_loss": final.get("train_loss"), "train_accuracy": final.get("train_accuracy"),
        "val_loss": final.get("val_loss"), "val_accuracy": final.get("val_accuracy"),
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
        "test_loss": None, "test_accuracy": None, "test_images": None, "test_top5_accuracy": None,
        "test_macro_f1": None,
        "val_top5_accuracy": final.get("val_top5_accuracy"), "val_ema_accuracy": final.get("val_ema_accuracy"),
        "stopped_early": state.stopped_early or None,
        "images_per_second": _mean_throughput(state.history),
    }


def _mean_throughput(history: list[dict]) -> float | None:
    """Training images/s over the run, leaving out the first epoch (warm-up) when there are more."""
    rows = history[1:] if len(history) > 1 else history
    seconds = sum(r["train_seconds"] for r in rows)
    return sum(r["images_per_second"] * r["train_seconds"] for r in rows) / seconds if seconds else None
