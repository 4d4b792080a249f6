import math

import pytest
import torch

from resnet_train import optim
from resnet_train.models import resnet20


def lrs(schedule, epochs=10, steps_per_epoch=4, warmup_epochs=0.0, lr=1.0):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = optim.Scheduler(opt, schedule, steps_per_epoch, warmup_epochs)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_goes_from_lr_to_final_fraction():
    values = lrs(optim.cosine(10, final_lr_fraction=0.1))
    assert values[0] == 1.0 and values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_multistep_drops_at_milestone_epochs():
    values = lrs(optim.multistep(10, milestones=[3, 6], gamma=0.1))
    assert values[:12] == [1.0] * 12 and values[12] == pytest.approx(0.1) and values[24] == pytest.approx(0.01)


def test_step_and_constant():
    assert lrs(optim.step(10, step_size=5, gamma=0.5))[20] == 0.5
    assert set(lrs(optim.constant(10))) == {1.0}


def test_linear_warmup_then_schedule():
    values = lrs(optim.constant(10), warmup_epochs=1)
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and values[4:] == [1.0] * 36


def test_onecycle_rises_then_falls():
    values = lrs(optim.onecycle(10, pct_start=0.25, div_factor=25, final_div_factor=1e4))
    peak = values.index(max(values))
    assert values[0] == pytest.approx(1 / 25) and peak == 10 and values[-1] < 0.01
    assert values[:11] == sorted(values[:11]) and values[10:] == sorted(values[10:], reverse=True)


def test_plateau_reduces_after_patience():
    schedule = optim.Plateau(10, factor=0.5, patience=1)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = optim.Scheduler(opt, schedule, 4)
    for loss in [1.0, 0.9, 0.95, 0.95]:
        sched.end_of_epoch(loss)
    assert opt.param_groups[0]["lr"] == 0.5
    state = sched.state_dict()
    fresh = optim.Scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0),
                            optim.Plateau(10, factor=0.5, patience=1), 4)
    fresh.load_state_dict(state)
    assert fresh.schedule.scale == 0.5 and fresh.schedule.best == 0.9


def test_norm_and_bias_excluded_from_weight_decay():
    model = resnet20()
    groups = optim.param_groups(model, 5e-4, decay_norm_and_bias=False)
    decayed, plain = groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 4 or p.dim() == 2 for p in decayed["params"])  # conv and linear weights
    assert all(p.dim() == 1 for p in plain["params"])  # BN weights/biases and the fc bias
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
