"""The training loop: `train_one_epoch`, `evaluate`, and `fit` that runs epochs of both.

No Hydra and no files here: results leave through the `logger` and `checkpoints` objects that
`fit` is given. Loss and accuracy accumulate on the device and are read (one host sync) once per
`log_every` steps and at the end of an epoch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data import Data, Loader
from .device import Precision
from .errors import TrainingDiverged
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
    images: int = 0
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
        self.images = start.images  # this process's images (the same count on every process)

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
        sums, bad = distributed.all_reduce(self.state[:2].clone()), distributed.all_reduce(self.state[2:].clone(), "max")
        (loss_sum, correct), (bad_step,) = sums.tolist(), bad.tolist()
        return loss_sum, correct, None if bad_step < 0 else int(bad_step)

    @property
    def total_images(self) -> int:
        return self.images * (torch.distributed.get_world_size() if distributed.active() else 1)


StepLogger = Callable[[int, float, float], None]  # (global step, mean loss since last call, lr)


def train_one_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
                    precision: Precision, scaler: torch.amp.GradScaler, *, global_step: int = 0,
                    start: EpochProgress | None = None, label_smoothing: float = 0.0, log_every: int = 50,
                    on_log: StepLogger | None = None, checkpoint_every: int = 0,
                    on_checkpoint: Callable[[EpochProgress, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, desc: str = "train",
                    progress: bool | None = None) -> tuple[EpochResult, int]:
    """One pass over `loader` (from batch `start.step` when resuming mid-epoch); returns the epoch's
    mean loss and accuracy and the new global step.

    Every `checkpoint_every` global steps `on_checkpoint(progress, global_step)` is called; when
    `should_stop()` turns true, TrainingInterrupted is raised after the current step. A NaN or
    infinite loss raises TrainingDiverged naming the step and its learning rate."""
    model.train()
    device = next(model.parameters()).device
    start = start or EpochProgress()
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
        return EpochProgress(step, loss_sum, correct, meter.images, logged_sum, logged_images,
                             time.perf_counter() - clock)

    bar = tqdm(total=len(loader), initial=start.step, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        for i, (images, labels) in enumerate(loader, start.step + 1):
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
            if checkpoint_every and global_step % checkpoint_every == 0 and i < len(loader) and on_checkpoint:
                on_checkpoint(snapshot(i), global_step)
    finally:
        bar.close()
    loss_sum, correct, _ = meter.read()
    n = max(meter.total_images, 1)
    return EpochResult(loss_sum / n, correct / n, meter.total_images, time.perf_counter() - clock), global_step


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, precision: Precision, num_classes: int, *,
             mistakes: int = 0, desc: str = "eval", progress: bool | None = None) -> EvalResult:
    """Mean loss, accuracy and confusion matrix of `model` on every image of `loader` (and its
    `mistakes` most confidently wrong predictions)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)  # no float64 on MPS
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    tracker = _MistakeTracker(mistakes) if mistakes else None
    images, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    for i, (batch, labels) in enumerate(bar, 1):
        with precision.autocast():
            logits = model(batch)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        cells = labels * num_classes + logits.argmax(1)
        confusion.scatter_add_(0, cells, torch.ones_like(cells))  # bincount would sync to size its output
        images += len(labels)
        if tracker is not None:
            tracker.add(batch, logits, labels)
        if not bar.disable and i % 10 == 0:  # a live readout costs a sync: only for a visible bar
            correct = confusion.view(num_classes, num_classes).diag().sum()
            bar.set_postfix({"loss": f"{loss_sum.item() / images:.4f}", "acc": f"{correct.item() / images:.2%}",
                             "img/s": f"{images / (time.perf_counter() - start):,.0f}"}, refresh=False)
    if distributed.active():  # every process evaluated its own shard: sum them
        distributed.all_reduce(loss_sum)
        distributed.all_reduce(confusion)
        images = int(distributed.all_reduce(torch.tensor([images], device=device)).item())
    confusion = confusion.view(num_classes, num_classes).cpu()
    correct = int(confusion.diag().sum())
    return EvalResult(loss_sum.item() / max(images, 1), correct / max(images, 1), images,
                      time.perf_counter() - start, confusion, tracker.result() if tracker else None)


# ------------------------------------------------------------------------------------------
# fit: epochs of train + validate, best/last checkpoints, final test with the best weights
# ------------------------------------------------------------------------------------------


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


class RunLogger(Protocol):
    def info(self, message: str) -> None: ...
    def train_step(self, step: int, loss: float, lr: float) -> None: ...
    def epoch(self, step: int, row: dict) -> None: ...
    def validation(self, step: int, epoch: int, result: EvalResult, model: nn.Module) -> None: ...
    def test(self, step: int, result: EvalResult) -> None: ...
    def write_metrics(self, metrics: dict, history: list[dict]) -> None: ...
    def flush(self) -> None: ...


class Checkpoints(Protocol):
    def save_last(self, state: TrainState) -> None: ...
    def copy_last_to_best(self) -> None: ...
    def load_model_weights(self, name: str) -> None: ...


def fit(model: nn.Module, data: Data, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
        precision: Precision, scaler: torch.amp.GradScaler, *, epochs: int, state: TrainState,
        logger: RunLogger, checkpoints: Checkpoints, label_smoothing: float = 0.0, log_every: int = 50,
        checkpoint_every: int = 0, should_stop: Callable[[], bool] | None = None,
        progress: bool | None = None, started_at: float | None = None, mistakes: int = 0) -> dict:
    """Train from where `state` stands (a fresh run, an epoch end or mid-epoch) to `epochs`; then test
    the best weights. Returns the final metrics (fractions 0..1).

    last.pt is written at every epoch end (and every `checkpoint_every` steps), best.pt whenever the
    validation accuracy improves; TensorBoard is flushed before each, so a run killed at any moment
    resumes with no step logged twice or missing. The final test keeps its `mistakes` most
    confidently wrong images for the logger."""
    num_classes = len(data.classes)
    wall_before, started_at = state.wall_seconds, started_at or time.time()

    def save_last() -> None:
        state.wall_seconds = wall_before + time.time() - started_at
        checkpoints.save_last(state)

    def save_mid_epoch(progress_: EpochProgress, global_step: int) -> None:
        state.global_step, state.epoch_progress = global_step, asdict(progress_)
        logger.flush()
        save_last()

    for epoch in range(state.epoch + 1, epochs + 1):
        resume = EpochProgress(**state.epoch_progress) if state.epoch_progress else None
        data.train.set_epoch(epoch, skip=resume.step if resume else 0)
        try:
            train, state.global_step = train_one_epoch(
                model, data.train, optimizer, scheduler, precision, scaler, global_step=state.global_step,
                start=resume, label_smoothing=label_smoothing, log_every=log_every, on_log=logger.train_step,
                checkpoint_every=checkpoint_every, on_checkpoint=save_mid_epoch, should_stop=should_stop,
                desc=f"epoch {epoch}/{epochs} train", progress=progress)
        except TrainingInterrupted as stop:
            save_mid_epoch(stop.progress, stop.global_step)
            raise
        state.epoch_progress = None
        val = evaluate(model, data.val, precision, num_classes, desc=f"epoch {epoch}/{epochs} val",
                       progress=progress) if data.val is not None else None
        scheduler.end_of_epoch(val.loss if val else None)
        is_best = val is None or val.accuracy > state.best_val_accuracy
        if is_best:
            state.best_val_accuracy, state.best_epoch = (val.accuracy if val else -1.0), epoch
        state.epoch = epoch
        if val is not None:
            logger.validation(state.global_step, epoch, val, model)
        row = {"epoch": epoch, "step": state.global_step, "train_loss": train.loss, "train_accuracy": train.accuracy,
               "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
               "val_images": val.images if val else 0, "train_images": train.images,
               "lr": scheduler.get_last_lr()[0], "images_per_second": train.images_per_second,
               "train_seconds": train.seconds, "epoch_seconds": train.seconds + (val.seconds if val else 0.0),
               "is_best": is_best}
        state.history.append(row)
        logger.epoch(state.global_step, row)  # TensorBoard (flushed) and the console line
        save_last()
        if is_best:
            checkpoints.copy_last_to_best()
        logger.write_metrics({**summarize(state), "wall_seconds": state.wall_seconds}, state.history)

    metrics = summarize(state)
    if data.test is not None and state.epoch > 0:
        checkpoints.load_model_weights("best")
        test = evaluate(model, data.test, precision, num_classes, mistakes=mistakes, desc="test", progress=progress)
        logger.test(state.global_step, test)
        metrics.update(test_loss=test.loss, test_accuracy=test.accuracy, test_images=test.images)
        logger.info(f"test (best weights, epoch {state.best_epoch}): loss {test.loss:.4f}  "
                    f"accuracy {test.accuracy:.2%} on {test.images:,} images")
    elif data.test is None:
        logger.info("no test split: skipped the final test evaluation")
    metrics["wall_seconds"] = wall_before + time.time() - started_at
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
        "test_loss": None, "test_accuracy": None, "test_images": None,
        "images_per_second": _mean_throughput(state.history),
    }


def _mean_throughput(history: list[dict]) -> float | None:
    """Training images/s over the run, leaving out the first epoch (warm-up) when there are more."""
    rows = history[1:] if len(history) > 1 else history
    seconds = sum(r["train_seconds"] for r in rows)
    return sum(r["images_per_second"] * r["train_seconds"] for r in rows) / seconds if seconds else None
