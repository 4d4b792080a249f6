"""resnet-train: one training run, or the continuation of one (`resume=`), from a composed config."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .. import budget, distributed, pause, runs
from ..build import (
    build_model,
    build_optimizer_and_scheduler,
    configure_backends,
    describe_model,
    load_data,
    pick_device_and_precision,
    seed_everything,
    step_settings,
    use_channels_last,
    wrap_for_training,
)
from ..checkpoint import RunCheckpoints, check_classes, restore_training
from ..config import duration_seconds, hparam_values
from ..data import Data, Shard
from ..device import Precision, describe
from ..engine import TrainingInterrupted
from ..errors import ConfigError, UserError
from ..fit import EarlyStopping, Loop, TrainState, fit
from ..reporting import ImageSettings, RunLogger, SilentLogger
from ..sweep import swept_keys

log = logging.getLogger("resnet_train")


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] = (), started_at: float | None = None) -> dict:
    """Train (or continue, `cfg.resume`) the run described by `cfg` in `run_dir`; return its final
    metrics. `overrides` is the command line, against which a resumed run's config is checked;
    `started_at`, when the command started (time_budget counts from it; default: now)."""
    started_at = started_at or time.time()
    world = distributed.from_environment()
    distributed.init_process_group(world)  # torchrun joined before Hydra; SLURM/submitit tasks join here
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process tells the story
    if world.is_main:
        runs.lock(run_dir)  # (already held when the CheckBeforeRun callback claimed it)
    try:
        return _train(cfg, Path(run_dir), list(overrides), world, started_at)
    finally:
        runs.unlock(run_dir)
        distributed.shutdown()


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str], world: distributed.Distributed,
           started_at: float) -> dict:
    cfg, ckpt = runs.plan_run(cfg, overrides)
    device, precision = pick_device_and_precision(cfg.device, cfg.precision, world.local_rank)
    if cfg.model.sync_bn and world.enabled and device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs CUDA GPUs (SyncBatchNorm runs on GPUs only)")
    configure_backends(device, cfg.deterministic)
    log.info(f"Run dir: {run_dir}")
    log.info(f"Device: {describe(device)}, precision {precision.name}{' (autocast)' if precision.dtype else ''}, "
             f"channels_last={use_channels_last(cfg.channels_last, device)}"
             + (f"; {world.world_size} processes (DistributedDataParallel), global batch {cfg.batch_size}"
                if world.enabled else ""))
    seed_everything(cfg.seed)
    data, model = _data_and_model(cfg, ckpt, device, run_dir, world)
    if cfg.epochs == "auto":
        cfg.epochs = _epochs_for_budget(cfg, model, data, precision, device, started_at)
    steps_per_epoch = len(data.train) // cfg.accumulate_grad_batches
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, steps_per_epoch, device)
    scaler, settings = precision.grad_scaler(), step_settings(cfg, model)
    if cfg.accumulate_grad_batches > 1:
        log.info(f"Effective batch: {cfg.accumulate_grad_batches} x {cfg.batch_size} = "
                 f"{cfg.accumulate_grad_batches * cfg.batch_size} images per optimizer step")
    state = TrainState()
    if ckpt is not None:
        state = restore_training(ckpt, model, optimizer, scheduler, scaler, cfg.resume, device, settings.ema)
        log.info(f"Resuming from {cfg.resume}: {_resume_point(state, cfg.epochs)}, step {state.global_step} "
                 f"(best val accuracy so far {_pct(state.best_val_accuracy)})")
    model = wrap_for_training(model, cfg, device)

    stored_cfg = OmegaConf.to_container(cfg, resolve=True)
    stored_cfg["dataset"].update(mean=data.mean, std=data.std)  # computed statistics are part of the run
    logger = _logger(cfg, stored_cfg, data, precision.name, run_dir, ckpt) if world.is_main else SilentLogger()
    checkpoints = RunCheckpoints(run_dir / "checkpoints", model, optimizer, scheduler, scaler, {
        "config": stored_cfg, "classes": data.classes, "precision": precision.name,
        "normalization": {"mean": data.mean, "std": data.std, "image_size": data.image_size,
                          "stored_size": data.stored_size},
    }, device=device, writer=world.is_main, resumed_from=state if ckpt is not None else None, ema=settings.ema)
    try:
        with GracefulStop() as stop:
            loop = Loop(optimizer, scheduler, precision, scaler, logger, checkpoints, step=settings,
                        log_every=cfg.log_every_n_steps, checkpoint_every=cfg.checkpoint.every_n_steps,
                        should_stop=distributed.agreed_stop(stop.requested, cfg.log_every_n_steps),
                        progress=cfg.progress if world.is_main else False,
                        mistakes=cfg.tensorboard.mistakes if cfg.tensorboard.images else 0, tta=cfg.tta,
                        ema_selects=cfg.ema.evaluate, early_stopping=EarlyStopping(**cfg.early_stopping))
            metrics = fit(model, data, loop, state, cfg.epochs, started_at)
    except TrainingInterrupted:
        stop.signum = stop.signum or signal.SIGTERM  # another process received it
        log.warning(f"Stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step "
                    f"{state.global_step}; saved {checkpoints.path('last')}. Resume with:\n  "
                    + (f"torchrun --nproc_per_node={world.world_size} -m resnet_train" if world.enabled
                       else "resnet-train") + " " + shlex.quote(f"resume={_shown(run_dir)}"))
        raise SystemExit(128 + stop.signum) from None
    finally:
        logger.close()
    log.info(f"Done in {metrics['wall_seconds']:.0f}s. best val accuracy {_pct(metrics['best_val_accuracy'])} "
             f"(epoch {metrics['best_epoch']}), test accuracy {_pct(metrics['test_accuracy'])}. "
             f"Results in {_shown(run_dir)}")
    pause.point("exit")
    return metrics


def _data_and_model(cfg: DictConfig, ckpt: dict | None, device: torch.device, run_dir: Path,
                    world: distributed.Distributed) -> tuple[Data, torch.nn.Module]:
    """The data and the model; a new run that fails here (bad data, say) leaves no run dir behind."""
    try:
        data = load_data(cfg, device, Shard(world.rank, world.world_size))
        log.info(f"Data: {cfg.dataset.name}, {data.train.num_images:,} training images in {data.storage}, "
                 f"{len(data.classes)} classes; validation on {data.val_source}")
        if len(data.train) < cfg.accumulate_grad_batches:
            raise ConfigError(f"accumulate_grad_batches={cfg.accumulate_grad_batches} needs that many batches an "
                              f"epoch; the training split has {len(data.train)}")
        if len(data.train) % cfg.accumulate_grad_batches:
            log.info(f"accumulate_grad_batches={cfg.accumulate_grad_batches}: the last "
                     f"{len(data.train) % cfg.accumulate_grad_batches} batch(es) of each epoch are left out "
                     "(an incomplete optimizer step)")
        if ckpt is not None:
            check_classes(ckpt["classes"], data.classes, cfg.resume)
        model = build_model(cfg, len(data.classes), device, load_pretrained=ckpt is None)
    except UserError:
        if ckpt is None and world.is_main and not swept_keys():
            runs.discard_unstarted(run_dir)
        raise
    log.info(f"Model: {describe_model(cfg, model)}")
    return data, model


def _epochs_for_budget(cfg: DictConfig, model: torch.nn.Module, data: Data, precision: Precision,
                       device: torch.device, started_at: float) -> int:
    """epochs=auto: time a few steps and pick the epochs that fit cfg.time_budget (the first
    process decides for all)."""
    seconds = duration_seconds(cfg.time_budget)
    eager = OmegaConf.merge(cfg, {"compile": False})  # (compiling a copy would cost the compile twice)
    timing = budget.measure(cfg, model, data, precision, device, wrap=lambda m: wrap_for_training(m, eager, device))
    elapsed = time.time() - started_at
    epochs = distributed.broadcast_from_main(budget.epochs_within(seconds, elapsed, timing))
    log.info(budget.describe(seconds, elapsed, timing, epochs))
    planned = budget.planned_seconds(elapsed, timing, epochs)
    if planned > seconds:
        log.warning(f"time_budget={cfg.time_budget} is too short for one epoch after {elapsed:.0f}s of setup: "
                    f"the run will take about {budget.duration_text(planned)}")
    if cfg.compile:
        log.warning("time_budget with compile=true: the epochs were timed uncompiled; compiling the model "
                    "in the first epoch is not in the estimate")
    return epochs


def _logger(cfg: DictConfig, stored_cfg: dict, data: Any, precision: str, run_dir: Path,
            ckpt: dict | None) -> RunLogger:
    tb = cfg.tensorboard
    logger = RunLogger(run_dir, OmegaConf.to_yaml(stored_cfg), hparam_values(cfg, precision, swept_keys()),
                       cfg.epochs, resume_step=ckpt["state"]["global_step"] if ckpt is not None else None,
                       settings=ImageSettings(data.classes, data.mean, data.std, tb.images,
                                              tb.confusion_every_n_epochs, tb.histograms_every_n_epochs))
    if ckpt is None and tb.images:
        data.train.set_epoch(0)  # epoch 0 is never trained: drawing its first batch changes nothing
        logger.augmented_samples(next(iter(data.train))[0])
    return logger


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.2%}"


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class GracefulStop:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM (preemption) asks training to stop at the
    next step boundary; a second one ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> GracefulStop:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        pause.release()
        log.warning(f"{signal.Signals(signum).name}: stopping after the current step and saving "
                    "(send it again to stop at once)")

    def requested(self) -> bool:
        return self.signum is not None


def out_of_memory_error(cfg: DictConfig) -> UserError:
    """What to say when the device ran out of memory: the batch size to try."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next job of a sweep starts with the memory this one held
    return UserError(f"out of memory on the device with batch_size={cfg.batch_size}; "
                     f"try batch_size={max(cfg.batch_size // 2, 1)}")


def _resume_point(state: TrainState, epochs: int) -> str:
    if state.epoch_progress:
        return f"part-way through epoch {state.epoch + 1}/{epochs}"
    if state.epoch >= epochs or state.stopped_early:
        return f"all {state.epoch} epochs trained, the final test to run"
    return f"at epoch {state.epoch + 1}/{epochs}"
