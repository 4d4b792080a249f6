"""Checkpoints: atomic writes, `weights_only` loading, clear errors for bad files.

A checkpoint is a plain dict of tensors and Python primitives (so `torch.load(weights_only=True)`
can read it without unpickling arbitrary objects):
  model, optimizer, scheduler, scaler   state dicts
  state                                 epoch, global_step, best_val_accuracy, best_epoch, history
  config                                the composed config (plain dict, interpolations resolved)
  classes, normalization, precision     what evaluation and prediction need to rebuild the run
  rng                                   per process: python, numpy, torch CPU and its CUDA device's
                                        generator states
Tensors are saved on the CPU, so a checkpoint written on any GPU loads on a machine without one.
"""

from __future__ import annotations

import functools
import io
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from . import distributed, pause
from .ema import WeightEMA
from .engine import OptimizerStep
from .errors import CheckpointError, TrainingDiverged
from .files import atomic_write, storage_error
from .run_state import TrainState
from .runs import checkpoint_file
from .stored_config import in_current_schema

REQUIRED_KEYS = ("model", "config", "classes")


def atomic_save(obj: Any, path: Path) -> None:
    def write(f: BinaryIO) -> None:
        torch.save(obj, f)
        pause.point("checkpoint_write")  # (written to the temporary file, not yet renamed)
    try:
        atomic_write(path, write)
    except RuntimeError as e:  # torch's zip writer reports a full disk as "enforce fail ... failed writing"
        raise storage_error(path, e) from None


def on_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it copied to the CPU: a checkpoint written on a GPU then loads on a
    machine without one, also with a plain `torch.load` (no map_location)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def atomic_copy(src: Path, dst: Path) -> None:
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)
    atomic_write(dst, copy)


def read_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True (tensors and plain data, never arbitrary objects); a file
    that cannot be read raises CheckpointError with the first line of the reason."""
    with open(path, "rb") as f:
        start = f.read(16)
    if not start.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive (torch.save) or a legacy pickle
        what = f"it begins with {start.decode('latin-1')!r}" if start else "it is empty"
        raise CheckpointError(f"{path} is not a torch file ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if "Weights only load failed" in lines[0]:  # torch's advice (unpickle it anyway) is not ours to give
            found = [line for line in lines if "GLOBAL" in line]
            if found:
                raise CheckpointError(f"{path} holds Python objects besides tensors ({found[0].rstrip('.')}): a "
                                      "pickle that can run code when loaded; resnet-train reads only weights") from None
            lines = [line for line in lines[1:] if not line.startswith(("Please file", "Check the doc"))] or lines
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): "
                              f"{lines[0][:200]}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a resnet-train checkpoint safely (weights_only) or raise CheckpointError with the reason."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    exported_metadata = path.with_name(path.name + ".metadata.json")  # (a state dict's, see export/)
    if path.suffix.lower() in (".onnx", ".ts", ".safetensors") or exported_metadata.is_file():
        raise CheckpointError(f"{path} is an exported model, not a checkpoint: predict with "
                              f"resnet-predict model={path}, or give the run's checkpoint")
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        lacking = ", ".join(k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt)
        raise CheckpointError(f"{path} is a torch file but not a resnet-train checkpoint (it lacks {lacking})")
    ckpt["config"] = in_current_schema(ckpt["config"])
    return ckpt


def selected_weights(ckpt: dict) -> dict:
    """The weights a run chose to be judged by: its EMA weights where it kept them and selects them
    (ema.evaluate), else the trained weights."""
    evaluate_ema = ckpt["config"].get("ema", {}).get("evaluate", True)
    return ckpt["ema"]["weights"] if "ema" in ckpt and evaluate_ema else ckpt["model"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile and DistributedDataParallel wrappers (whose state-dict names
    carry prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def load_model_state(model: nn.Module, state: dict, source: str) -> None:
    """Load weights, turning a shape or name mismatch, or NaN/inf in them, into one line."""
    check_model_state(model, state, source)
    bad = next((name for name, t in state.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
    if bad is not None:
        raise CheckpointError(f"the weights in {source} are not finite ({bad} holds NaN/inf): the run that wrote "
                              "it diverged; use an earlier checkpoint")
    unwrap(model).load_state_dict(state)


def check_classes(trained_on: list[str], data_classes: list[str], source: str) -> None:
    """CheckpointError when the data's classes are not the ones the checkpoint learned."""
    if list(trained_on) != list(data_classes):
        show = lambda names: f"{len(names)} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"  # noqa: E731
        raise CheckpointError(f"the weights in {source} do not fit this data: they were trained on classes "
                              f"{show(trained_on)}, the data has {show(data_classes)}")


def check_model_state(model: nn.Module, state: dict, source: str) -> None:
    """CheckpointError naming the first name or shape in `state` that `model` does not have."""
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)} there, "
                  f"{tuple(own[mismatched[0]].shape)} here" if mismatched else
                  f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise CheckpointError(f"the weights in {source} do not fit this model ({detail}); "
                              "was it trained with another model or number of classes?")


def rng_states(device: torch.device) -> dict:
    """This process's generator states (its own CUDA device's only: another machine may have fewer GPUs)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every process's generator states, in rank order. (Sent as torch.save bytes: all_gather_object
    cannot unpickle tensors in torch 2.14.)"""
    buffer = io.BytesIO()
    torch.save(rng_states(device), buffer)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in distributed.gather_objects(buffer.getvalue())]


def restore_rng_states(saved: list[dict] | dict, device: torch.device) -> None:
    """Each process takes its own rank's states (the first rank's if the run had fewer processes)."""
    states = saved if isinstance(saved, list) else [saved]
    mine = states[min(distributed.rank(), len(states) - 1)]
    random.setstate((mine["python"][0], tuple(mine["python"][1]), mine["python"][2]))
    kind, keys, *rest = mine["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(mine["torch"])
    cuda = mine.get("cuda")
    if isinstance(cuda, list):  # an older checkpoint: every device's state
        cuda = cuda[device.index or 0] if device.type == "cuda" and len(cuda) > (device.index or 0) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def restore_training(ckpt: dict, step: OptimizerStep, source: str, device: torch.device) -> TrainState:
    """Put the step's model, optimizer, scheduler, scaler and EMA, and the RNGs, back where `ckpt`
    left them. The device and precision may differ from the run's: a grad scaler starts fresh when
    the run had none (bf16 or fp32 before, fp16 now) and is dropped when this run needs none."""
    missing = [k for k in ("optimizer", "scheduler", "scaler", "state", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} cannot be resumed: it lacks {', '.join(missing)}")
    optimizer, scheduler, scaler, ema = step.optimizer, step.scheduler, step.scaler, step.settings.ema
    load_model_state(step.model, ckpt["model"], source)
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source}: the optimizer or scheduler state does not fit this run ({e})") from None
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)  # fused/foreach kernels as chosen for this device, not the saving one
        _place_steps(optimizer, group)
    if ckpt["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if "ema" not in ckpt:
            raise CheckpointError(f"{source} cannot be resumed with ema.decay > 0: it holds no EMA weights")
        ema.load_state_dict(ckpt["ema"])
    restore_rng_states(ckpt["rng"], device)
    return TrainState.of_checkpoint(ckpt)


def _place_steps(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """A group's `step` counters where torch keeps them for its kernels: beside the weights when fused
    or capturable, else on the CPU -- also when the checkpoint was saved by the other kind (a fused
    CUDA run resumed on a Mac, or the reverse)."""
    on_device = group.get("fused") or group.get("capturable")
    for param in group["params"]:
        state = optimizer.state.get(param, {})
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(dtype=torch.float32, device=param.device if on_device else "cpu")


class RunCheckpoints:
    """`last.pt` and `best.pt` of one run: everything needed to evaluate, predict or resume. With
    several processes only the first writes (`writer=True`); all read. Only finite state is ever
    written: a save after the weights or optimizer state became NaN/inf raises TrainingDiverged."""

    def __init__(self, run_dir: Path, step: OptimizerStep, metadata: dict, device: torch.device, writer: bool = True,
                 resumed_from: TrainState | None = None):
        self.run_dir, self.step, self.device, self.writer = run_dir, step, device, writer
        self.metadata = metadata  # config, classes, normalization, precision
        self.saved: TrainState | None = resumed_from  # what last.pt holds now

    @property
    def model(self) -> nn.Module:
        return self.step.model

    def path(self, name: str) -> Path:
        return checkpoint_file(self.run_dir, name)

    def save_last(self, state: TrainState) -> None:
        step, ema = self.step, self.step.settings.ema
        bad = first_nonfinite(step.model, step.optimizer, ema)
        if bad is not None:
            raise TrainingDiverged(f"the weights became NaN/inf by step {state.global_step} ({bad} is not finite); "
                                   "lower optim.lr or add scheduler.warmup_epochs")
        rng = gather_rng_states(self.device)
        if self.writer:
            atomic_save(on_cpu({
                "model": unwrap(step.model).state_dict(),
                "optimizer": step.optimizer.state_dict(),
                "scheduler": step.scheduler.state_dict(),
                "scaler": step.scaler.state_dict(),
                "state": asdict(state),
                "rng": rng,
                **({"ema": ema.state_dict()} if ema is not None else {}),
                **self.metadata,
            }), self.path("last"))
        self.saved = TrainState(**asdict(state))

    def last_good(self) -> str:
        """Where the run can be continued from, for the divergence message."""
        if self.saved is None:
            return "no checkpoint was written before it"
        where = f"epoch {self.saved.epoch + 1}, step {self.saved.global_step}" if self.saved.epoch_progress else \
            f"end of epoch {self.saved.epoch}, step {self.saved.global_step}"
        return f"the last good checkpoint is {self.path('last')} ({where})"

    def copy_last_to_best(self) -> None:
        if self.writer:
            atomic_copy(self.path("last"), self.path("best"))

    def repair_best(self, state: TrainState) -> None:
        """A run killed between writing last.pt and updating best.pt: last.pt holds the end of the
        best epoch (it says so) but best.pt an older one. Copy it now, before anything reads best.pt."""
        if not self.writer or state.best_epoch == 0 or state.best_epoch != state.epoch or state.epoch_progress:
            return
        best = self.path("best")
        if not best.exists() or load_checkpoint(best)["state"]["epoch"] != state.best_epoch:
            atomic_copy(self.path("last"), best)

    def mark_finished(self, state: TrainState) -> None:
        """Record in last.pt that the final test is done (the model in memory now holds the best
        weights, so last.pt's own weights are kept)."""
        distributed.barrier()
        if self.writer:
            ckpt = load_checkpoint(self.path("last"))
            ckpt["state"] = asdict(state)
            atomic_save(ckpt, self.path("last"))

    def load_model_weights(self, name: str) -> None:
        """The model gets the weights checkpoint `name` selects (its EMA weights where the run kept
        and selects them: `selected_weights`, as eval, predict and export take them)."""
        if self.writer:  # (the others receive them: no shared disk needed)
            load_model_state(self.model, selected_weights(load_checkpoint(self.path(name))), str(self.path(name)))
        distributed.broadcast_tensors(unwrap(self.model).state_dict().values())


def first_nonfinite(model: nn.Module, optimizer: torch.optim.Optimizer, ema: WeightEMA | None = None) -> str | None:
    """The name of the first parameter, buffer or optimizer (or EMA) state tensor holding NaN/inf,
    or None. One host sync when all are finite."""
    named = [(f"model.{n}", t) for n, t in unwrap(model).state_dict().items()]
    if ema is not None:
        named += [(f"ema.{n}", t) for n, t in ema.module.state_dict().items()]
    named += [(f"optimizer.{k}", t) for i, s in enumerate(optimizer.state.values()) for k, t in s.items()
              if isinstance(t, torch.Tensor)]
    named = [(n, t) for n, t in named if t.is_floating_point()]
    # torch keeps an optimizer's `step` counters on the CPU beside GPU weights unless it is fused or
    # capturable: 0-dim CPU tensors may join GPU ones in an elementwise operation, never in a stack.
    if not named or bool(functools.reduce(torch.logical_and, (t.detach().isfinite().all() for _, t in named))):
        return None
    return next(n for n, t in named if not bool(t.detach().isfinite().all()))
