"""resnet-train: one training run, or the continuation of one (`resume=`), from a composed config."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import budget, distributed, environment, pause, preflight, runs, world
from ..build import build_model, describe_model, load_data, seed_everything, training_step, wrap_for_training
from ..checkpoint import RunCheckpoints, check_classes, load_checkpoint, restore_training
from ..config import check_class_weights, duration_seconds, hparam_values
from ..data import Data, Shard
from ..device import Precision, configure_backends, describe, use_channels_last
from ..engine import TrainingInterrupted
from ..errors import ConfigError, PeerLost, UserError, first_line
from ..fit import Cadence, EvalSettings, Fit
from ..reporting import ImageSettings, RunReporter, SilentReporter
from ..run_state import EarlyStopping, TrainState
from ..sweep import in_sweep, swept_keys
from ..trackers import TrackedRun, Trackers, open_trackers

log = logging.getLogger("resnet_train")


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] = (), started_at: float | None = None) -> dict:
    """Train (or continue, `cfg.resume`) the run described by `cfg` in `run_dir`; return its final
    metrics. `overrides` is the command line, against which a resumed run's config is checked;
    `started_at`, when the command started (time_budget counts from it; default: now). The run is
    planned here unless preflight.CheckBeforeRun planned it before Hydra made the run dir."""
    started_at = started_at or time.time()
    this = world.from_environment()
    # (torchrun's processes joined before Hydra; SLURM's and submitit's tasks join here)
    distributed.init_process_group(this, duration_seconds(cfg.collective_timeout))
    if not this.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process tells the story
    if this.is_main:
        runs.lock(run_dir)  # (already held when the CheckBeforeRun callback claimed it)
    if cfg.resume == "auto" or (not cfg.resume and os.environ.get("SUBMITIT_EXECUTOR")):
        # A sweep continued with resume=auto, or a submitit job that was requeued (a sweep refuses used
        # job dirs before it submits): the job continues its run where it has one, else starts it.
        found = distributed.decided_by_main(lambda: runs.has_checkpoint(run_dir))
        with open_dict(cfg):
            cfg.resume = str(runs.checkpoint_file(run_dir)) if found else None
        finished = _finished_metrics(run_dir) if found else None
        if finished is not None:
            log.info(f"{_shown(run_dir)} has finished its run: kept as it is")
            return finished
    shown_dir = run_dir  # (the run dir as the first process names it: the others run in scratch dirs)
    try:
        plan = preflight.take_plan(run_dir) or preflight.plan_run(cfg, list(overrides), this)
        # (after planning, where the first process's plan broadcast its checkpoint: before Hydra)
        shown_dir = Path(distributed.decided_by_main(lambda: str(run_dir)))
        metrics = _train(plan, Path(run_dir), started_at)
        distributed.barrier()  # (a process that failed at the end fails the others: its job is failed)
        return metrics
    except RuntimeError as e:
        if not distributed.is_peer_failure(e):
            raise
        raise PeerLost(_peer_lost(e, shown_dir, this)) from None
    finally:
        runs.unlock(run_dir)
        runs.remove_scratch(run_dir)
        distributed.shutdown()


def _train(plan: preflight.Plan, run_dir: Path, started_at: float) -> dict:
    cfg, device, precision, this = plan.config, plan.device, plan.precision, plan.world
    configure_backends(device, cfg.deterministic)
    log.info(f"Run dir: {run_dir}")
    log.info(f"Device: {describe(device)}, precision {precision.name}{' (autocast)' if precision.dtype else ''}, "
             f"channels_last={use_channels_last(cfg.channels_last, device)}"
             + (f"; {this.world_size} processes (DistributedDataParallel), global batch {cfg.batch_size}"
                if this.enabled else ""))
    trackers = _open_trackers(plan, run_dir) if this.is_main else None  # (before any data is read)
    try:
        return _train_with(plan, run_dir, started_at, trackers)
    finally:
        if trackers is not None:
            trackers.close()


def _train_with(plan: preflight.Plan, run_dir: Path, started_at: float, trackers: Trackers | None) -> dict:
    cfg, device, precision, this = plan.config, plan.device, plan.precision, plan.world
    seed_everything(cfg.seed)
    data, model = _data_and_model(plan, run_dir, trackers)
    if cfg.epochs == "auto":
        cfg.epochs = _epochs_for_budget(cfg, model, data, precision, device, started_at)
    step = training_step(cfg, model, precision, len(data.train) // cfg.accumulate_grad_batches, device,
                         data.class_counts)
    if step.scaler.is_enabled() and not any(group.get("fused") for group in step.optimizer.param_groups):
        log.info(f"Note: fp16 with {type(step.optimizer).__name__}, which has no fused kernel: the GradScaler checks "
                 "the gradients for inf on the host, one GPU sync a step (fused optimizers and bf16 have none)")
    if cfg.accumulate_grad_batches > 1:
        log.info(f"Effective batch: {cfg.accumulate_grad_batches} x {cfg.batch_size} = "
                 f"{cfg.accumulate_grad_batches * cfg.batch_size} images per optimizer step")
    state = TrainState()
    if plan.checkpoint is not None:
        state = restore_training(plan.checkpoint, step, cfg.resume, device)
        log.info(f"Resuming from {cfg.resume}: {_resume_point(state, cfg.epochs)}, step {state.global_step} "
                 f"(best val accuracy so far {_pct(state.best_val_accuracy)})")
    step.model = wrap_for_training(model, cfg, device)
    stored_cfg = OmegaConf.to_container(cfg, resolve=True)
    stored_cfg["dataset"].update(mean=data.mean, std=data.std)  # computed statistics are part of the run
    reporter = (_reporter(cfg, stored_cfg, data, precision.name, run_dir, plan, trackers) if this.is_main
                else SilentReporter())
    metadata = _checkpoint_metadata(stored_cfg, data, precision, trackers.ids() if trackers is not None else {})
    checkpoints = RunCheckpoints(run_dir, step, metadata, device, writer=this.is_main,
                                 resumed_from=plan.resumed_state)
    try:
        with GracefulStop() as stop:
            cadence = Cadence(cfg.log_every_n_steps, cfg.checkpoint.every_n_steps,
                              distributed.agreed_stop(stop.requested, cfg.log_every_n_steps),
                              cfg.progress if this.is_main else False)
            evaluation = EvalSettings(cfg.tta, cfg.tensorboard.mistakes if cfg.tensorboard.images else 0,
                                      cfg.ema.evaluate, EarlyStopping(**cfg.early_stopping))
            metrics = Fit(step, data, reporter, checkpoints, cadence, evaluation).run(state, cfg.epochs, started_at)
    except TrainingInterrupted:
        stop.signum = stop.signum or signal.SIGTERM  # another process received it
        log.warning(f"Stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step "
                    f"{state.global_step}; saved {checkpoints.path('last')}. Resume with:\n  {_resume_command(run_dir, this)}")
        stop.requeue()
        raise SystemExit(128 + stop.signum) from None
    finally:
        reporter.close()
    log.info(f"Done in {metrics['wall_seconds']:.0f}s. best val accuracy {_pct(metrics['best_val_accuracy'])} "
             f"(epoch {metrics['best_epoch']}), test accuracy {_pct(metrics['test_accuracy'])}. "
             f"Results in {_shown(run_dir)}")
    pause.point("exit")
    return metrics


def _checkpoint_metadata(stored_cfg: dict, data: Data, precision: Precision, tracker_ids: dict[str, str]) -> dict:
    """What every checkpoint carries besides the training state: what evaluation and prediction need,
    the trackers' run ids (a resume continues the same tracker runs) and, for shards, what an epoch's
    order depends on."""
    layout = getattr(data.train, "layout", None)
    return {"config": stored_cfg, "classes": data.classes, "precision": precision.name, "storage": data.storage,
            "normalization": {"mean": data.mean, "std": data.std, "image_size": data.image_size,
                              "stored_size": data.stored_size}, "trackers": tracker_ids,
            **({"stream_layout": layout} if layout else {})}


@contextlib.contextmanager
def _left_unstarted(plan: preflight.Plan, run_dir: Path, trackers: Trackers | None = None) -> Iterator[None]:
    """A new run that fails before training (bad data, a tracker that does not answer) leaves no run
    dir behind (its trackers closed first: W&B writes into it)."""
    try:
        yield
    except UserError:
        if plan.checkpoint is None and plan.world.is_main and not swept_keys():
            if trackers is not None:
                trackers.close()
            runs.discard_unstarted(run_dir)
        raise


def _open_trackers(plan: preflight.Plan, run_dir: Path) -> Trackers:
    """The chosen trackers, started (a resumed run's: the runs its checkpoint names, reopened)."""
    resumed = plan.resumed_state
    run = TrackedRun(run_dir, run_dir.name if in_sweep() else _shown(run_dir),
                     resumed.global_step if resumed is not None else None,
                     dict(plan.checkpoint.get("trackers") or {}) if plan.checkpoint is not None else {})
    with _left_unstarted(plan, run_dir):
        return open_trackers(OmegaConf.to_container(plan.config.get("logger") or {}), run)


def _peer_lost(error: RuntimeError, run_dir: Path, this: world.World) -> str:
    """A collective failed: what happened, what was saved, how to go on -- in one line."""
    cause = re.sub(r"^\[[^\]]*\] ", "", first_line(error))  # (gloo prefixes its source file and line)
    saved = ("" if not this.is_main else f"; the last checkpoint is {_shown(runs.checkpoint_file(run_dir))}"
             if runs.has_checkpoint(run_dir) else "; no checkpoint was written yet")  # (the first process's dir)
    return (f"process {this.rank} of {this.world_size}: another process of the run exited or stopped answering "
            f"({cause}){saved}; continue with: {_resume_command(run_dir, this)}")


def _resume_command(run_dir: Path, this: world.World) -> str:
    """The command that continues the run, as the user would type it (with several machines: on
    each, as it was started there)."""
    resume = shlex.quote(f"resume={_shown(run_dir)}")
    if not this.enabled:
        return f"resnet-train {resume}"
    nodes = this.world_size // this.local_world_size
    if this.launcher in ("slurm", "submitit"):
        return f"the same job ({this.world_size} tasks) with {resume} added to its resnet-train command"
    if nodes == 1:
        return f"torchrun --nproc_per_node={this.world_size} -m resnet_train {resume}"
    return (f"torchrun --nnodes={nodes} --nproc_per_node={this.local_world_size} <your rendezvous options> "
            f"-m resnet_train {resume}   (on each of the {nodes} machines)")


def _finished_metrics(run_dir: Path) -> dict | None:
    """The final metrics of the run in `run_dir` if it finished (all epochs trained and tested), else None."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    if not TrainState.of_checkpoint(load_checkpoint(runs.checkpoint_file(run_dir))).tested:  # (tested: finished)
        return None
    return json.loads(metrics_file.read_text())


def _data_and_model(plan: preflight.Plan, run_dir: Path,
                    trackers: Trackers | None = None) -> tuple[Data, torch.nn.Module]:
    """The data and the model; a new run that fails here (bad data, say) leaves no run dir behind."""
    cfg, this, ckpt = plan.config, plan.world, plan.checkpoint
    with _left_unstarted(plan, run_dir, trackers):
        # dataset.loader=auto decides by the memory free when a run starts; its resume keeps that
        # decision (memory and stream shuffle from different generators), whatever it finds free.
        kept = ckpt.get("storage") if ckpt is not None and cfg.dataset.get("loader") == "auto" else None
        data = load_data(cfg, plan.device, Shard(this.rank, this.world_size), **({"loader": kept} if kept else {}))
        log.info(f"Data: {cfg.dataset.name}, {data.train.num_images:,} training images in {data.storage}, "
                 f"{len(data.classes)} classes; validation on {data.val_source}")
        if len(data.train) < cfg.accumulate_grad_batches:
            raise ConfigError(f"accumulate_grad_batches={cfg.accumulate_grad_batches} needs that many batches an "
                              f"epoch; the training split has {len(data.train)}")
        if len(data.train) % cfg.accumulate_grad_batches:
            log.info(f"accumulate_grad_batches={cfg.accumulate_grad_batches}: the last "
                     f"{len(data.train) % cfg.accumulate_grad_batches} batch(es) of each epoch are left out "
                     "(an incomplete optimizer step)")
        check_class_weights(cfg, len(data.classes))
        if ckpt is not None:
            check_classes(ckpt["classes"], data.classes, cfg.resume)
            _check_stream_layout(ckpt, data)
        model = build_model(cfg, len(data.classes), plan.device, load_pretrained=ckpt is None)
    log.info(f"Model: {describe_model(cfg, model)}")
    return data, model


def _check_stream_layout(ckpt: dict, data: Data) -> None:
    """A shard stream's order within an epoch depends on the processes and workers reading it: a
    run resumed mid-epoch continues that epoch exactly only with the same ones."""
    saved, now = ckpt.get("stream_layout"), getattr(data.train, "layout", None)
    if saved and now and saved != now and TrainState.of_checkpoint(ckpt).epoch_progress:
        raise ConfigError(f"this run stopped mid-epoch reading its shards with {saved['processes']} process(es) x "
                          f"{saved['num_workers']} worker(s) (num_workers={saved['num_workers']}); the epoch continues "
                          f"exactly only with the same: resume with num_workers={saved['num_workers']} and "
                          f"{saved['processes']} process(es)")


def _epochs_for_budget(cfg: DictConfig, model: torch.nn.Module, data: Data, precision: Precision,
                       device: torch.device, started_at: float) -> int:
    """epochs=auto: time a few steps and pick the epochs that fit cfg.time_budget (the first
    process decides for all)."""
    seconds = duration_seconds(cfg.time_budget)
    twin = copy.deepcopy(model)  # (the run's own model is not touched)
    step = training_step(OmegaConf.merge(cfg, {"epochs": 1}), twin, precision,
                         max(len(data.train) // cfg.accumulate_grad_batches, 1), device, data.class_counts)
    step.model = wrap_for_training(twin, OmegaConf.merge(cfg, {"compile": False}), device)  # (compiling a copy
    timing = budget.measure(step, twin, data, cfg.tta)                                      # would cost it twice)
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


def _reporter(cfg: DictConfig, stored_cfg: dict, data: Data, precision: str, run_dir: Path,
              plan: preflight.Plan, trackers: Trackers | None) -> RunReporter:
    tb, resumed = cfg.tensorboard, plan.resumed_state
    with_tensorboard = "tensorboard" in (cfg.get("logger") or {})
    reporter = RunReporter(run_dir, OmegaConf.to_yaml(stored_cfg), hparam_values(cfg, precision, swept_keys()),
                           cfg.epochs, resume_step=resumed.global_step if resumed is not None else None,
                           settings=ImageSettings(data.classes, data.mean, data.std, tb.images,
                                                  tb.confusion_every_n_epochs, tb.histograms_every_n_epochs),
                           trackers=trackers, environment=environment.collect(plan.device),
                           tensorboard=with_tensorboard)
    if resumed is None and tb.images and with_tensorboard:
        data.train.set_epoch(0)  # epoch 0 is never trained: drawing its first batch changes nothing
        reporter.augmented_samples(next(iter(data.train))[0])
    return reporter


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
    """While active, the first SIGINT (Ctrl-C) or SIGTERM (preemption) -- or, in a submitit job,
    USR2 (the warning before its time limit or a preemption) -- asks training to stop at the next
    step boundary; a second one ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> GracefulStop:
        signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR2] if os.environ.get("SUBMITIT_EXECUTOR") else [])
        self.previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def requeue(self) -> None:
        """After a USR2 stop was saved: submitit's own handler of it, which requeues the job (from
        the first task) and exits; the requeued job continues the run from last.pt."""
        handler = self.previous.get(signal.SIGUSR2)
        if self.signum == signal.SIGUSR2 and callable(handler):
            handler(signal.SIGUSR2, None)

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
