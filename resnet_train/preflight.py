"""The checks before a run, and the plan they produce: a run is planned once.

`plan_run` makes every check that needs no data, cheapest first, so a mistake is one line before
anything is created or read: the config's values (before torch is imported), the resume command
line against the run it continues, the time budget, the global batch against the processes, the
device and precision, the optimizer's and schedule's arguments (built for a dummy parameter), and
whether a resumed run has anything left to do. Its `Plan` -- the config to train with, the device
and precision resolved here, the checkpoint a resume continues (read once, here) -- is what the
command trains.

`CheckBeforeRun` (a Hydra callback, train.yaml) plans a single run before Hydra creates its run
dir, claims and locks the dir (runs.py), and leaves the plan for `commands/train` to `take_plan`.
A sweep's jobs and torchrun's other processes plan in the command itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from . import runs, world
from .composing import train_defaults
from .config import LIST_GROUPS, RESUMABLE, override_key, validate
from .errors import ConfigError, Refused, UserError
from .files import remove_stale_temporaries
from .run_state import EarlyStopping, TrainState
from .stored_config import apply_command_line

if TYPE_CHECKING:  # (torch is imported once the config's values have passed)
    import torch

    from .device import Precision

RESUME_REFUSAL = ("a resumed run keeps its model, data and optimization; start a new run to change it "
                  "(only where, how fast and how long it runs may change: see the README)")


@dataclass
class Plan:
    """What a run trains with, after every check that needs no data."""

    config: DictConfig  # a resumed run's: its stored config with the command line's permitted changes
    device: torch.device
    precision: Precision  # resolved on `device`
    checkpoint: dict | None  # the checkpoint a resume continues (None: a new run)
    world: world.World

    @property
    def resumed_state(self) -> TrainState | None:
        return TrainState.of_checkpoint(self.checkpoint) if self.checkpoint is not None else None


def plan_run(cfg: DictConfig, overrides: list[str], this: world.World | None = None) -> Plan:
    """Check a run described by `cfg` (composed from the command line `overrides`) for process
    `this` of its world; ConfigError (or another UserError) naming what is wrong."""
    validate(cfg, of_stored_run=bool(cfg.resume))  # (before torch is imported: answers at once)
    from . import distributed
    from .build import check_buildable, check_weights_fit
    from .checkpoint import load_checkpoint
    from .device import pick_device_and_precision

    this = this or world.from_environment()
    ckpt = None
    if not cfg.resume and cfg.time_budget is not None and cfg.epochs != "auto":  # (a stored run has both)
        raise ConfigError(f"time_budget={cfg.time_budget} picks the number of epochs: set epochs=auto with it")
    if cfg.resume:  # (read by the first process, received by the others: no shared disk needed)
        ckpt = distributed.decided_by_main(lambda: load_checkpoint(cfg.resume))
        check_weights_fit(ckpt, cfg.resume)
        cfg = _resumed_config(ckpt, cfg, overrides)
    if cfg.batch_size % this.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} (the global batch) does not split evenly over "
                          f"{this.world_size} processes; use a multiple of {this.world_size}")
    if this.local_world_size > 1 and re.fullmatch(r"cuda:\d+", str(cfg.device)):
        raise ConfigError(f"device={cfg.device} would put all {this.local_world_size} processes of this machine on "
                          "one GPU; with device=cuda (or auto) each takes its own (LOCAL_RANK): choose the GPUs "
                          "with CUDA_VISIBLE_DEVICES")
    device, precision = pick_device_and_precision(cfg.device, cfg.precision, this.local_rank)
    if cfg.model.sync_bn and this.enabled and device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs CUDA GPUs (SyncBatchNorm runs on GPUs only)")
    check_buildable(cfg, device)
    plan = Plan(cfg, device, precision, ckpt, this)
    if ckpt is not None:
        _check_left_to_do(plan.resumed_state, cfg)
    return plan


def _resumed_config(ckpt: dict, given: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's stored config with the command line's changes, where a resumed run may change."""
    resumed = apply_command_line(ckpt["config"], OmegaConf.masked_copy(given, [k for k in given if k != "hydra"]),
                                 train_defaults(), overrides, RESUMABLE.__contains__, RESUME_REFUSAL)
    resumed.resume = given.resume
    if any(override_key(o) in LIST_GROUPS for o in overrides):  # (the trackers chosen now, not added to the run's)
        for group in LIST_GROUPS:
            resumed.pop(group, None)
            if group in given:
                resumed[group] = given[group]
    validate(resumed, of_stored_run=True)
    return resumed


def _check_left_to_do(state: TrainState, cfg: DictConfig) -> None:
    """A resumed run that is finished (or that early stopping would have ended) is refused."""
    run_dir = runs.run_dir_of(Path(cfg.resume))
    rule = EarlyStopping(**cfg.early_stopping)
    if state.tested and not state.stopped_early and state.epoch < cfg.epochs and rule.ends_after(state, state.epoch):
        raise ConfigError(f"{run_dir}: early stopping would have ended this run after its last epoch ({state.epoch}: "
                          f"no improvement of {rule.metric} for {state.early_bad_epochs} epochs), so it is finished; "
                          "start a new run to train more")
    if state.finished(cfg.epochs) and state.stopped_early:
        raise ConfigError(f"{run_dir} was stopped early after epoch {state.stopped_early} (early_stopping) and is "
                          "finished; start a new run to train more")
    if state.finished(cfg.epochs):
        raise ConfigError(f"{run_dir} has finished all {state.epoch} epochs; resume with epochs=N "
                          f"(N > {state.epoch}) to train longer")


# --------------------------------------------------------------------------------------------
# Planned before Hydra makes the run dir, taken by the command
# --------------------------------------------------------------------------------------------

_planned: dict[Path, Plan] = {}  # run dir -> the plan CheckBeforeRun made for it, until the command takes it


def take_plan(run_dir: Path) -> Plan | None:
    """The plan CheckBeforeRun made for `run_dir` (once), or None where it made none."""
    return _planned.pop(Path(run_dir).resolve(), None)


class CheckBeforeRun(Callback):
    """Hydra callback, before Hydra creates the run dir or writes anything into it: plan the run,
    then claim and lock the run dir -- a new run's must be empty, a resumed run's must not be in
    use. (Hydra calls on_run_start for single runs only: a sweep's jobs plan in the command.)"""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        overrides = list(config.hydra.overrides.task)
        run_dir = Path(config.hydra.run.dir).resolve()
        try:
            plan = plan_run(task_cfg, overrides)
            if task_cfg.resume:
                runs.lock(run_dir)
                remove_stale_temporaries(run_dir)
            elif _named_by_the_time(config):
                run_dir = runs.claim_default_run_dir(run_dir, overrides)
                with read_write(config.hydra.run):  # (Hydra creates the dir it names after this callback)
                    config.hydra.run.dir = str(run_dir)
            else:
                runs.claim_new_run_dir(run_dir, overrides)
        except UserError as e:  # Hydra would only warn about an exception raised here, and go on
            raise Refused(e) from None
        _planned.clear()  # (one run per command)
        _planned[run_dir] = plan


def _named_by_the_time(config: DictConfig) -> bool:
    """Whether the run dir is train.yaml's default, named by the time the command started (not given
    with hydra.run.dir, nor agreed on by torchrun's processes)."""
    given = any(o.split("=", 1)[0] == "hydra.run.dir" for o in config.hydra.overrides.hydra)
    return not given and runs.STAMP_ENV not in os.environ
