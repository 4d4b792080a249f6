"""An exponential moving average of the weights (and BatchNorm statistics), updated every optimizer step.

torch.optim.swa_utils' EMA update (`get_ema_multi_avg_fn`: one `_foreach_lerp_` per dtype group)
does the averaging, but not through `AveragedModel.update_parameters`, which compares its update
count with 0 on every call -- a host sync per step. The update count lives on the host here.
With `warmup` the decay ramps up as min(decay, (1 + n) / (10 + n)) (timm's and TensorFlow's
warmup), so early averages are not dominated by the random initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightEMA:
    """The average of `model`'s weights and buffers (`module`); `update()` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        ours, theirs = self.module.state_dict(), model.state_dict()  # (tensors that stay the same objects)
        self._floats = [(ours[k], theirs[k]) for k in ours if ours[k].is_floating_point()]
        self._others = [(ours[k], theirs[k]) for k in ours if not ours[k].is_floating_point()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        get_ema_multi_avg_fn(self.current_decay())([a for a, _ in self._floats], [m for _, m in self._floats], None)
        for average, current in self._others:  # integer buffers (BatchNorm's num_batches_tracked): copied
            average.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = state["updates"]
