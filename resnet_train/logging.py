"""Where results are written: console lines, TensorBoard event files and `metrics.json`.

TensorBoard tags (all in the run directory, one event stream per run; the x axis is the global
training step everywhere, so a resumed run purges whatever a killed one logged after its checkpoint):
  loss/train, loss/val, accuracy/train, accuracy/val   at each epoch's last step; overlaid in the
                                                       CUSTOM SCALARS tab
  train/loss, train/lr                                 every `log_every_n_steps` steps
  epoch, lr, throughput/images_per_second              at each epoch's last step
  metrics/*                                            final metrics, shown in the HPARAMS tab
  config                                               the composed config (TEXT tab)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import custom_scalars, hparams

from .checkpoint import atomic_write

log = logging.getLogger("resnet_train")

# Final metrics shown in TensorBoard's HPARAMS tab (as scalars named metrics/<key>).
HPARAM_METRICS = ("best_val_accuracy", "test_accuracy", "test_loss", "val_accuracy", "train_loss", "train_accuracy")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader (or a crash) never sees half a file."""
    text = json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON serializable: {value!r}")


def _finite_values(row: dict) -> dict:
    """JSON has no NaN: a diverged run's non-finite numbers are written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class RunLogger:
    """Console + TensorBoard + metrics.json for one training run."""

    def __init__(self, run_dir: Path, config_yaml: str, hparam_values: dict[str, Any], epochs: int,
                 resume_step: int | None = None):
        """A new run writes its headers (config, chart layout, hparams); a resumed one (`resume_step`
        = the checkpoint's global step) continues the same event stream, hiding later events."""
        self.run_dir, self.epochs = run_dir, epochs
        if resume_step is not None:
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=resume_step + 1)
            return
        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.writer.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)  # markdown code block
        self.writer.file_writer.add_summary(custom_scalars({
            "train vs val": {
                "loss": ["Multiline", ["loss/train", "loss/val"]],
                "accuracy": ["Multiline", ["accuracy/train", "accuracy/val"]],
            }}))
        # The hparams session is declared now, so a run that stops early still shows in HPARAMS;
        # its metric values are the metrics/* scalars written by `finish`.
        experiment, session_start, _ = hparams(hparam_values, {f"metrics/{k}": 0.0 for k in HPARAM_METRICS})
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def info(self, message: str) -> None:
        log.info(message)

    def train_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, row: dict) -> None:
        w = self.writer
        w.add_scalar("loss/train", row["train_loss"], step)
        w.add_scalar("accuracy/train", row["train_accuracy"], step)
        if row["val_loss"] is not None:
            w.add_scalar("loss/val", row["val_loss"], step)
            w.add_scalar("accuracy/val", row["val_accuracy"], step)
        w.add_scalar("epoch", row["epoch"], step)
        w.add_scalar("lr", row["lr"], step)
        w.add_scalar("throughput/images_per_second", row["images_per_second"], step)
        w.flush()
        val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:6.2%}" if row["val_loss"] is not None
               else "no validation")
        width = len(str(self.epochs))
        log.info(f"epoch {row['epoch']:>{width}}/{self.epochs}  train loss {row['train_loss']:.4f} acc "
                 f"{row['train_accuracy']:6.2%}  {val}  lr {row['lr']:.4g}  "
                 f"{row['images_per_second']:,.0f} img/s  {row['epoch_seconds']:.1f}s{'  *best' if row['is_best'] else ''}")

    def flush(self) -> None:
        self.writer.flush()

    def write_metrics(self, metrics: dict, history: list[dict]) -> None:
        write_json(self.run_dir / "metrics.json",
                   {**_finite_values(metrics), "history": [_finite_values(row) for row in history]})

    def finish(self, metrics: dict, history: list[dict], step: int) -> None:
        for key in HPARAM_METRICS:
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"metrics/{key}", metrics[key], step)
        self.writer.file_writer.add_summary(hparams({}, {})[2])  # session end: status success
        self.writer.flush()
        self.write_metrics(metrics, history)

    def close(self) -> None:
        self.writer.close()
