"""Checkpoints: atomic writes, `weights_only` loading, clear errors for bad files.

A checkpoint is a plain dict of tensors and Python primitives (so `torch.load(weights_only=True)`
can read it without unpickling arbitrary objects):
  model, optimizer, scheduler, scaler   state dicts
  state                                 epoch, global_step, best_val_accuracy, best_epoch, history
  config                                the composed config (plain dict, interpolations resolved)
  classes, normalization, precision     what evaluation and prediction need to rebuild the run
  rng                                   python, numpy, torch CPU and CUDA generator states
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from torch import nn

from . import distributed
from .engine import TrainState

REQUIRED_KEYS = ("model", "config", "classes")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the requested run."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that readers (and a crash at any moment) see the old or the new file, never
    half of one: write a temporary file beside it, fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: Path, dst: Path) -> None:
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)
    atomic_write(dst, copy)


def read_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True (tensors and plain data, never arbitrary objects); a file
    that cannot be read raises CheckpointError with the first line of the reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): "
                              f"{reason[:200]}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a resnet-train checkpoint safely (weights_only) or raise CheckpointError with the reason."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is a torch file but not a resnet-train checkpoint "
                              f"(it lacks {', '.join(k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt)})")
    return ckpt


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile and DistributedDataParallel wrappers (whose state-dict names
    carry prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def load_model_state(model: nn.Module, state: dict, source: str) -> None:
    """Load weights, turning a shape or name mismatch into one line naming the first difference."""
    model = unwrap(model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)} there, "
                  f"{tuple(own[mismatched[0]].shape)} here" if mismatched else
                  f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise CheckpointError(f"the weights in {source} do not fit this model ({detail}); "
                              "was it trained with another model or number of classes?")
    model.load_state_dict(state)


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def restore_training(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     scaler: torch.amp.GradScaler, source: str) -> TrainState:
    """Put model, optimizer, scheduler, scaler and RNGs back where `ckpt` left them."""
    missing = [k for k in ("optimizer", "scheduler", "scaler", "state", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} cannot be resumed: it lacks {', '.join(missing)}")
    load_model_state(model, ckpt["model"], source)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source}: the optimizer or scheduler state does not fit this run ({e})") from None
    restore_rng_states(ckpt["rng"])
    return TrainState(**ckpt["state"])


class RunCheckpoints:
    """`last.pt` and `best.pt` of one run: everything needed to evaluate, predict or resume. With
    several processes only the first writes (`writer=True`); all read."""

    def __init__(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: torch.amp.GradScaler, metadata: dict, writer: bool = True):
        self.directory, self.writer = directory, writer
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.metadata = metadata  # config, classes, normalization, precision

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.pt"

    def save_last(self, state: TrainState) -> None:
        if not self.writer:
            return
        atomic_save({
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(state),
            "rng": rng_states(),
            **self.metadata,
        }, self.path("last"))

    def copy_last_to_best(self) -> None:
        if self.writer:
            atomic_copy(self.path("last"), self.path("best"))

    def load_model_weights(self, name: str) -> None:
        distributed.barrier()  # the first process has written it
        load_model_state(self.model, load_checkpoint(self.path(name))["model"], str(self.path(name)))
