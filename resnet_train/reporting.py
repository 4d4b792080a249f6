"""Where results are written: console lines, TensorBoard event files and `metrics.json`.

TensorBoard tags (all in the run directory, one event stream per run; the x axis is the global
training step everywhere, so a resumed run purges whatever a killed one logged after its checkpoint):
  loss/train, loss/val, accuracy/train, accuracy/val   at each epoch's last step; overlaid in the
                                                       CUSTOM SCALARS tab (with the EMA's)
  loss/val_ema, accuracy/val_ema                       the EMA weights' (with ema.decay > 0)
  accuracy_top5/val                                    with more than 5 classes
  train/loss, train/lr                                 every `log_every_n_steps` steps
  epoch, lr, throughput/images_per_second              at each epoch's last step
  test_class_f1/<class>                                each class's F1 on the test split (beside metrics/*)
  metrics/*                                            final metrics (at the step after the last
                                                       training step), shown in the HPARAMS tab
  config                                               the composed config (TEXT tab)
  environment                                          versions, device, CPU, commit, host, command
                                                       (TEXT tab; each session's, at its first step)
The same scalars, under the same tags at the same steps, go to the chosen trackers (trackers.py).
With `tensorboard.images` (IMAGES tab):
  train/augmented_samples                              a grid of augmented training images, at the start
  val/confusion_matrix, val_class_accuracy/<class>     every `confusion_every_n_epochs` epochs
  test/confusion_matrix, test/most_confident_mistakes  at the end, with the best weights
With `tensorboard.histograms_every_n_epochs` (HISTOGRAMS tab): weights/<name>, gradients/<name>.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import custom_scalars, hparams
from torchvision.utils import make_grid

from .environment import as_markdown
from .files import storage_error, write_json
from .runs import checkpoint_file
from .trackers import Trackers

log = logging.getLogger("resnet_train")

# Final metrics shown in TensorBoard's HPARAMS tab (as scalars named metrics/<key>).
HPARAM_METRICS = ("best_val_accuracy", "test_accuracy", "test_loss", "val_accuracy", "train_loss", "train_accuracy",
                  "test_top5_accuracy", "test_macro_f1", "val_ema_accuracy")


def denormalize(images: torch.Tensor, mean: list[float] | None, std: list[float] | None) -> torch.Tensor:
    """Normalized NCHW images back to 0..1 for viewing."""
    images = images.float().cpu()
    if mean is not None:
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return images.clamp(0, 1)


def confusion_figure(confusion: torch.Tensor, classes: list[str]):
    """A labelled confusion-matrix heat map (rows: true class, columns: predicted), row-normalized."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    rates = (confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    labels = classes if n <= 40 else [""] * n
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    fig.tight_layout()
    return fig


def mistakes_figure(images: torch.Tensor, labels: list[int], predicted: list[int], confidence: list[float],
                    classes: list[str]):
    """A grid of images titled `true -> predicted (confidence)`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, true, pred, conf in zip(axes.flat, images, labels, predicted, confidence):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{classes[true]} -> {classes[pred]} ({conf:.0%})", fontsize=9)
    fig.tight_layout()
    return fig


@dataclass
class ImageSettings:
    """What RunReporter draws besides scalars."""

    classes: list[str]
    mean: list[float] | None
    std: list[float] | None
    images: bool = True
    confusion_every: int = 1  # epochs
    histograms_every: int = 0  # epochs; 0: never


class RunReporter:
    """Console + TensorBoard + metrics.json + the chosen trackers (trackers.py) for one training run."""

    def __init__(self, run_dir: Path, config_yaml: str, hparam_values: dict[str, Any], epochs: int,
                 resume_step: int | None = None, settings: ImageSettings | None = None,
                 trackers: Trackers | None = None, environment: dict[str, Any] | None = None,
                 tensorboard: bool = True):
        """A new run writes its headers (config, chart layout, hparams); a resumed one (`resume_step`
        = the checkpoint's global step) continues the same event stream, hiding later events. The
        trackers get the hyperparameters, the environment and the config either way (each keeps
        what its run already holds); `tensorboard=False`: no event files."""
        self.run_dir, self.epochs = run_dir, epochs
        self.settings = settings or ImageSettings([], None, None, images=False)
        self.trackers, self.environment = trackers or Trackers([]), environment or {}
        self.writer = self._writer(run_dir, resume_step, tensorboard)
        if self.environment:  # (each session's, at the step it starts from)
            self.writer.add_text("environment", as_markdown(self.environment), resume_step or 0)
        self.trackers.start(hparam_values, self.environment, config_yaml)
        if resume_step is not None:
            self.writer.flush()
            return
        self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)  # markdown code block
        self.writer.file_writer.add_summary(custom_scalars({
            "train vs val": {
                "loss": ["Multiline", ["loss/train", "loss/val", "loss/val_ema"]],
                "accuracy": ["Multiline", ["accuracy/train", "accuracy/val", "accuracy/val_ema"]],
            }}))
        # The hparams session is declared now, so a run that stops early still shows in HPARAMS;
        # its metric values are the metrics/* scalars written by `finish`.
        experiment, session_start, _ = hparams(hparam_values, {f"metrics/{k}": 0.0 for k in HPARAM_METRICS})
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    @staticmethod
    def _writer(run_dir: Path, resume_step: int | None, tensorboard: bool) -> Any:
        if not tensorboard:
            return _NoWriter()
        if resume_step is None:
            return _StorageChecked(SummaryWriter(log_dir=str(run_dir)))
        _after_earlier_event_files(run_dir)
        return _StorageChecked(SummaryWriter(log_dir=str(run_dir), purge_step=resume_step + 1))

    def info(self, message: str) -> None:
        log.info(message)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def train_step(self, step: int, loss: float, lr: float) -> None:
        values = {"train/loss": loss, "train/lr": lr}
        self._scalars(values, step)
        self.trackers.metrics(values, step)

    def epoch(self, step: int, row: dict) -> None:
        values = epoch_scalars(row)
        self._scalars(values, step)
        self.writer.flush()
        self.trackers.epoch(values, step)
        val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:6.2%}" if row["val_loss"] is not None
               else "no validation")
        if row.get("val_ema_accuracy") is not None:
            val += f"  ema acc {row['val_ema_accuracy']:6.2%}"
        width = len(str(self.epochs))
        log.info(f"epoch {row['epoch']:>{width}}/{self.epochs}  train loss {row['train_loss']:.4f} acc "
                 f"{row['train_accuracy']:6.2%}  {val}  lr {row['lr']:.4g}  "
                 f"{row['images_per_second']:,.0f} img/s  {row['epoch_seconds']:.1f}s"
                 f"{'  *best' if row['is_best'] else ''}")

    def flush(self) -> None:
        self.writer.flush()

    def augmented_samples(self, images: torch.Tensor) -> None:
        """A grid of (normalized, augmented) training images as the model sees them, de-normalized."""
        if self.settings.images:
            grid = make_grid(denormalize(images[:64], self.settings.mean, self.settings.std), nrow=8, padding=2)
            self.writer.add_image("train/augmented_samples", grid, 0)

    def validation(self, step: int, epoch: int, result: Any, model: nn.Module, grad_scale: float = 1.0) -> None:
        """`grad_scale`: what the last step's gradients are still multiplied by (fp16's loss scale)."""
        s = self.settings
        if s.images and s.confusion_every and epoch % s.confusion_every == 0:
            values = {f"val_class_accuracy/{name}": accuracy
                      for name, accuracy in zip(s.classes, result.per_class_accuracy)}
            self._scalars(values, step)
            self.trackers.metrics(values, step)
            self.writer.add_figure("val/confusion_matrix", confusion_figure(result.confusion, s.classes), step)
        if s.histograms_every and epoch % s.histograms_every == 0:
            for name, p in model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
                if p.grad is not None:
                    self.writer.add_histogram(f"gradients/{name}", p.grad.float().cpu() / grad_scale, step)

    def test(self, step: int, result: Any) -> None:
        s = self.settings
        if not s.images:
            return
        self.writer.add_figure("test/confusion_matrix", confusion_figure(result.confusion, s.classes), step)
        if result.mistakes is not None and len(result.mistakes.images):
            m = result.mistakes
            self.writer.add_figure("test/most_confident_mistakes", mistakes_figure(
                denormalize(m.images, s.mean, s.std), m.labels, m.predicted, m.confidence, s.classes), step)
        self.writer.flush()

    def write_metrics(self, metrics: dict, history: list[dict]) -> None:
        write_json(self.run_dir / "metrics.json", {**metrics, "environment": self.environment, "history": history})

    def finish(self, metrics: dict, history: list[dict], step: int) -> None:
        values = {f"metrics/{key}": metrics[key] for key in HPARAM_METRICS if metrics.get(key) is not None}
        values |= {f"test_class_f1/{name}": scores["f1"] for name, scores in (metrics.get("test_per_class") or {}).items()}
        self._scalars(values, step)
        self.writer.file_writer.add_summary(hparams({}, {})[2])  # session end: status success
        self.writer.flush()
        self.write_metrics(metrics, history)
        self.trackers.metrics(values, step)
        self.trackers.finish(checkpoint_file(self.run_dir, "best"))

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.trackers.close()


def epoch_scalars(row: dict) -> dict[str, float]:
    """An epoch's line of metrics.json's history as TensorBoard's scalars (tag -> value)."""
    values = {"loss/train": row["train_loss"], "accuracy/train": row["train_accuracy"]}
    for name in ("val", "val_ema"):
        if row.get(f"{name}_loss") is not None:
            values[f"loss/{name}"] = row[f"{name}_loss"]
            values[f"accuracy/{name}"] = row[f"{name}_accuracy"]
    if row.get("val_top5_accuracy") is not None:
        values["accuracy_top5/val"] = row["val_top5_accuracy"]
    return {**values, "epoch": row["epoch"], "lr": row["lr"], "throughput/images_per_second": row["images_per_second"]}


class _NoWriter:
    """SummaryWriter's place when TensorBoard is not among the chosen loggers: writes nothing."""

    def __getattr__(self, name: str) -> Any:
        return self if name == "file_writer" else (lambda *args, **kwargs: None)


class _StorageChecked:
    """A SummaryWriter (or its file writer) whose failed writes are one StorageError naming its
    event file and the room left on that file's disk. TensorBoard writes from a thread of its own,
    which keeps the error (a full disk, a read-only folder) and raises it at the next call here; the
    thread's own traceback is not printed (`_quiet_writer_thread`)."""

    def __init__(self, target: Any):
        self._target = target
        _quiet_writer_thread()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name == "file_writer":
            return _StorageChecked(attr)
        if not callable(attr):
            return attr

        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                raise storage_error(self._event_file(), e) from None
        return checked

    def _event_file(self) -> Path:
        writer = getattr(self._target, "file_writer", self._target)
        return Path(writer.event_writer._file_name)  # (tensorboard's EventFileWriter names its file here)


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread re-raises a failed write after keeping it for the next call (where
    `_StorageChecked` reports it in one line): its traceback would only repeat it, 25 lines long."""
    if getattr(threading.excepthook, "quiet_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)
    hook.quiet_tensorboard = True
    threading.excepthook = hook


def _after_earlier_event_files(run_dir: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after the run's earlier ones.
    TensorBoard reads a run's files in name order -- events.out.tfevents.<seconds>.<host>.<pid>... --
    and a resumed run's purge hides the steps after its checkpoint only in files read before its
    own: a resume within the second the killed run started in, by a process of a lower pid, would
    otherwise be read first and the killed run's later steps shown twice."""
    stamps = [int(p.name.split(".")[3]) for p in Path(run_dir).glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


class SilentReporter:
    """The RunReporter of every process but the first when several train one model: they compute the
    same numbers, one writes them."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
