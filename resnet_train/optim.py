"""Optimizer parameter groups and learning-rate schedules.

A schedule is a plain function of the (fractional) epoch returning a factor of the base learning
rate; `Scheduler` wraps it with linear warmup in a `LambdaLR` stepped after every optimizer
step. `plateau` is the one schedule that also listens to the validation loss.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

import torch
from torch import nn

ScheduleFn = Callable[[float], float]


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = True,
                 backbone_lr_scale: float = 1.0, lr: float | None = None) -> list[dict]:
    """Trainable parameters in groups: with `decay_norm_and_bias=False` BatchNorm and bias parameters
    get no weight decay; with `backbone_lr_scale` != 1 everything but the classifier (fc) trains at
    `lr * backbone_lr_scale`. Frozen parameters (requires_grad=False) are left out."""
    no_decay = set()
    if not decay_norm_and_bias:
        no_decay = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for p in m.parameters(recurse=False)}
        no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = name.startswith("fc.") or backbone_lr_scale == 1.0
            groups.setdefault((head, id(p) not in no_decay), []).append(p)
    out = []
    for (head, decays), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if not head:
            group["lr"] = lr * backbone_lr_scale
        out.append(group)
    return out


def build_optimizer(model: nn.Module, factory: Callable[..., torch.optim.Optimizer], weight_decay: float,
                    decay_norm_and_bias: bool = True, backbone_lr_scale: float = 1.0,
                    lr: float | None = None) -> torch.optim.Optimizer:
    """`factory` is the optimizer class with its hyperparameters bound (Hydra `_partial_`)."""
    return factory(param_groups(model, weight_decay, decay_norm_and_bias, backbone_lr_scale, lr))


# Schedules: factories called with the run's length, returning epoch -> factor ----------------


def constant(epochs: int) -> ScheduleFn:
    return lambda epoch: 1.0


def step(epochs: int, step_size: int = 30, gamma: float = 0.1) -> ScheduleFn:
    return lambda epoch: gamma ** int(epoch // step_size)


def multistep(epochs: int, milestones: Iterable[float] = (), gamma: float = 0.1) -> ScheduleFn:
    marks = sorted(milestones)
    return lambda epoch: gamma ** bisect.bisect_right(marks, epoch)


def cosine(epochs: int, final_lr_fraction: float = 0.0) -> ScheduleFn:
    def fn(epoch: float) -> float:
        t = min(epoch / epochs, 1.0)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))
    return fn


def onecycle(epochs: int, pct_start: float = 0.3, div_factor: float = 25.0,
             final_div_factor: float = 1e4) -> ScheduleFn:
    """Smith's 1cycle (torch's OneCycleLR, cosine annealing): up from lr/div_factor, then down to
    lr/(div_factor*final_div_factor)."""
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def anneal(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))

    def fn(epoch: float) -> float:
        t = min(epoch / epochs, 1.0)
        if t < pct_start:
            return anneal(start, 1.0, t / pct_start)
        return anneal(1.0, end, (t - pct_start) / (1 - pct_start))
    return fn


class Plateau:
    """Divide the learning rate by 1/factor when the validation loss stops improving (like
    torch's ReduceLROnPlateau, relative threshold, min mode)."""

    def __init__(self, epochs: int, factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                 min_lr_fraction: float = 0.0):
        self.factor, self.patience, self.threshold, self.min_scale = factor, patience, threshold, min_lr_fraction
        self.scale, self.best, self.bad_epochs = 1.0, math.inf, 0

    def __call__(self, epoch: float) -> float:
        return self.scale

    def update(self, val_loss: float) -> None:
        if val_loss < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale, self.bad_epochs = max(self.scale * self.factor, self.min_scale), 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad_epochs = state["scale"], state["best"], state["bad_epochs"]


class Scheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over optimizer steps: linear warmup times the schedule's factor at the current epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ScheduleFn, steps_per_epoch: int,
                 warmup_epochs: float = 0.0):
        self.schedule, self.steps_per_epoch = schedule, steps_per_epoch
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return warm * self.schedule(step / self.steps_per_epoch)

    def end_of_epoch(self, val_loss: float | None) -> None:
        """Tell a metric-driven schedule (plateau) the epoch's validation loss."""
        if isinstance(self.schedule, Plateau) and val_loss is not None:
            self.schedule.update(val_loss)
            self._last_lr = [base * self.factor(self.last_epoch) for base in self.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, self._last_lr):
                group["lr"] = lr

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas", "schedule")}
        if isinstance(self.schedule, Plateau):
            state["plateau"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "plateau" in state:
            self.schedule.load_state_dict(state.pop("plateau"))
        self.__dict__.update(state)
