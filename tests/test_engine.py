"""The loop itself: bf16 trains as well as fp32, metrics are read once per logging interval, and
a diverging run stops with a clear message."""
import re

import pytest
import torch
from conftest import make_images

from resnet_train import engine, evaluation
from resnet_train.data import Augment, BatchTransform, MemoryLoader
from resnet_train.device import Precision
from resnet_train.models import resnet20
from resnet_train.optim import Scheduler, constant, cosine

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def loaders(n_train=640, n_val=320, batch_size=32):
    images, labels = make_images(n_train + n_val, seed=5)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    train = MemoryLoader(images[:n_train], labels[:n_train], batch_size, BatchTransform(MEAN, STD, Augment()), True)
    val = MemoryLoader(images[n_train:], labels[n_train:], 128, BatchTransform(MEAN, STD), False)
    return train, val


def train_and_validate(precision: str, epochs: int = 2, lr: float = 0.05, **kw):
    torch.manual_seed(0)
    train, val = loaders()
    model = resnet20().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = Scheduler(opt, cosine(epochs), len(train))
    p = Precision(precision, "cpu")
    step = engine.OptimizerStep(model, opt, sched, p)
    for epoch in range(1, epochs + 1):
        train.set_epoch(epoch)
        result, _ = engine.train_one_epoch(step, train, progress=False, hooks=engine.EpochHooks(**kw))
    return result, evaluation.evaluate(model, val, p, 10, progress=False)


def test_bf16_trains_as_well_as_fp32():
    _, fp32 = train_and_validate("fp32")
    _, bf16 = train_and_validate("bf16")
    assert fp32.accuracy > 0.5 and bf16.accuracy > 0.5  # chance: 0.1
    assert abs(bf16.accuracy - fp32.accuracy) < 0.1
    assert fp32.confusion.sum() == 320 and fp32.confusion.diag().sum() == round(fp32.accuracy * 320)


def test_metrics_are_read_once_per_logging_interval(monkeypatch):
    reads, logged = [], []
    original = engine._Meter.read
    monkeypatch.setattr(engine._Meter, "read", lambda self: reads.append(1) or original(self))
    result, _ = train_and_validate("bf16", epochs=1, log_every=7, on_log=lambda *a: logged.append(a))
    steps = 640 // 32  # 20
    assert len(logged) == 3 and [s for s, _, _ in logged] == [7, 14, 20]  # every 7 steps and the epoch's end
    assert len(reads) == 3 + 1  # those, plus the end-of-epoch summary; never once per step
    assert result.images == steps * 32


def test_divergence_names_the_step_and_learning_rate():
    with pytest.raises(engine.TrainingDiverged) as e:
        train_and_validate("fp32", epochs=1, lr=1e10, log_every=5)
    step, lr = re.search(r"NaN/inf at step (\d+) \(learning rate ([\d.e+]+)\)", str(e.value)).groups()
    assert 1 <= int(step) <= 5 and float(lr) > 1e9  # found within the first logging window, lr of that step


def test_step_log_sees_the_warmup_learning_rate():
    train, _ = loaders(n_train=320)
    model = resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Scheduler(opt, constant(1), len(train), warmup_epochs=1)
    logged = []
    step = engine.OptimizerStep(model, opt, sched, Precision("bf16", "cpu"))
    engine.train_one_epoch(step, train, progress=False,
                           hooks=engine.EpochHooks(log_every=5, on_log=lambda step, loss, lr: logged.append(lr)))
    # lr after s steps of a 10-step linear warmup: 0.1 * min(1, (s + 1) / 10)
    assert logged == pytest.approx([0.06, 0.1])
