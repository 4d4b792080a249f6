"""What a run has done so far (`TrainState`, kept in every checkpoint besides the tensors), and the
rules read from it: is the run finished, would early stopping end it. No torch: the checks before a
run read these from a checkpoint before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Progress of a run: what a checkpoint needs besides the model, optimizer and RNG states."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    wall_seconds: float = 0.0  # of every session of this run, up to the last checkpoint
    epoch_progress: dict | None = None  # engine.EpochProgress of an unfinished epoch (mid-epoch checkpoint)
    history: list[dict] = field(default_factory=list)  # one row of metrics per epoch
    tested: bool = False  # the final test is recorded: the run is finished
    test: dict | None = None  # test_loss, test_accuracy, test_images of the final test
    stopped_early: int = 0  # the epoch early stopping ended the run at (0: it did not)
    early_best: float | None = None  # early stopping: the best value of its metric so far
    early_bad_epochs: int = 0  # early stopping: epochs since that value

    @classmethod
    def of_checkpoint(cls, ckpt: dict) -> TrainState:
        """A checkpoint's state (checkpoints from before the test phase existed were tested)."""
        return cls(**{"tested": True, **ckpt["state"]})

    def finished(self, epochs: int) -> bool:
        return (self.epoch >= epochs or self.stopped_early > 0) and not self.epoch_progress and self.tested


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after `patience` epochs without an improvement of `metric` by more than `min_delta`
    (never before `min_epochs`; patience 0: never stop early)."""

    patience: int = 0
    min_epochs: int = 0
    metric: str = "val_accuracy"  # or val_loss
    min_delta: float = 0.0

    def record(self, state: TrainState, accuracy: float, loss: float) -> None:
        """Count the epochs since the metric last improved (the count lives in `state`, so a
        resumed run keeps it)."""
        if not self.patience:
            return
        value = accuracy if self.metric == "val_accuracy" else -loss  # higher is better
        if state.early_best is None or value > state.early_best + self.min_delta:
            state.early_best, state.early_bad_epochs = value, 0
        else:
            state.early_bad_epochs += 1

    def ends_after(self, state: TrainState, epoch: int) -> bool:
        """Whether the run stops after `epoch`, by the count in `state`."""
        return bool(self.patience) and state.early_bad_epochs >= self.patience and epoch >= self.min_epochs
