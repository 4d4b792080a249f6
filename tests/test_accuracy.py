"""More accuracy per hour: augmentation policies in the data path, MixUp/CutMix, EMA, test-time
augmentation, clipping, accumulation, early stopping, top-5, and the time budget."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Runner, assert_ok, events, make_images, metrics_of
from test_faults import kill, start_paused

from resnet_train import budget, engine, evaluation
from resnet_train.data import Augment, BatchTransform, MemoryLoader
from resnet_train.device import Precision
from resnet_train.ema import WeightEMA
from resnet_train.mixing import Mixer
from resnet_train.optim import Scheduler, constant

FAST = ["model=resnet20", "epochs=2", "batch_size=32", "num_workers=0", "tensorboard.images=false",
        "dataset.val_size=40", "log_every_n_steps=2"]

SETTINGS = {
    "autoaugment": ["augment=autoaugment"],
    "randaugment": ["augment=randaugment", "augment.num_ops=1"],
    "trivialaugment": ["augment=trivialaugment"],
    "cutout": ["augment=cutout"],
    "erasing": ["augment.erasing=0.5"],
    "resized crop + jitter": ["augment=resized_crop"],
    "mixup": ["mix.mixup_alpha=0.2"],
    "cutmix": ["mix.cutmix_alpha=1"],  # (an int, as users type it)
    "ema + tta": ["ema.decay=0.9", "tta=flip_translate"],
    "clip + accumulate": ["grad_clip_norm=1.0", "accumulate_grad_batches=2", "optim.lr=0.2"],
    "early stopping": ["early_stopping.patience=1", "epochs=3"],
}


@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_trains_above_chance(cifar_root, train_in_process, tmp_path, name):
    metrics = train_in_process(tmp_path / "run", *FAST, *SETTINGS[name], f"dataset.root={cifar_root}")
    assert metrics["best_val_accuracy"] > 0.3 and metrics["test_accuracy"] > 0.3  # chance: 0.1
    assert metrics["test_top5_accuracy"] >= metrics["test_accuracy"]  # 10 classes: top-5 is reported
    history = metrics_of(tmp_path / "run")["history"]
    assert all(row["val_top5_accuracy"] >= row["val_accuracy"] for row in history)
    if name == "ema + tta":
        assert all(row["val_ema_accuracy"] is not None for row in history)
        tags = set(events(tmp_path / "run").Tags()["scalars"])
        assert {"accuracy/val_ema", "loss/val_ema", "accuracy_top5/val"} <= tags
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["ema"]["updates"] == 2 * (960 // 32) and ckpt["ema"]["weights"].keys() == ckpt["model"].keys()


def random_batch(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("augment", [Augment(policy="trivialaugment", cutout=8), Augment(policy="autoaugment"),
                                     Augment(crop="resized", color_jitter=0.4, erasing=0.5),
                                     Augment(policy="randaugment", num_ops=2, magnitude=12)])
def test_the_same_seed_gives_the_same_augmented_batch_and_skipping_draws_matches(augment):
    """Two batches from one generator equal one skipped (drawn, not applied) and one applied."""
    transform = BatchTransform((0.5,) * 3, (0.25,) * 3, augment)
    images = random_batch()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first, second = transform(images, g1), transform(images, g1)
    transform.skip(len(images), 32, g2)
    assert torch.equal(transform(images, g2), second) and not torch.equal(first, second)
    assert torch.equal(transform(images, torch.Generator().manual_seed(5)), first)
    shard = transform(images[4:12], torch.Generator().manual_seed(5), draws=16, keep=slice(4, 12))
    assert torch.equal(shard, first[4:12])  # a data-parallel slice sees exactly its rows of the global batch


def test_policy_ops_in_the_data_path_are_torchvisions():
    """The loader's policy step applies, per image, torchvision's own op for what that image drew."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    from resnet_train.data import policies
    images = random_batch(8)
    params = policies.draw_policy("trivialaugment", 8, 32, torch.Generator().manual_seed(1))
    ours = policies.apply_policy(images, params)
    for i, image in enumerate(images):
        op, magnitude = policies.OP_NAMES[int(params.slots[0].op[i])], float(params.slots[0].magnitude[i])
        theirs = _apply_op(image.permute(2, 0, 1), op, magnitude, InterpolationMode.NEAREST, None)
        assert torch.equal(ours[i].permute(2, 0, 1), theirs), op


def test_tta_logits_are_the_mean_over_the_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        model(x)
        flip = evaluation.predict_logits(model, x, "flip")
        torch.testing.assert_close(flip, (model(x) + model(x.flip(-1))) / 2)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [x, padded[..., :8, :8], padded[..., 2:, 2:]]
        mirrored = [(model(v) + model(v.flip(-1))) / 2 for v in views]
        torch.testing.assert_close(evaluation.predict_logits(model, x, "flip_translate"),
                                   0.5 * mirrored[0] + 0.25 * (mirrored[1] + mirrored[2]))
        assert torch.equal(evaluation.predict_logits(model, x, "none"), model(x))


def test_accumulating_k_batches_of_b_equals_one_batch_of_k_times_b():
    """On a BatchNorm-free model, without augmentation: the same weights within float tolerance."""
    images, labels = (torch.from_numpy(a) for a in make_images(96, seed=4))

    def train(batch_size: int, accumulate: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32 * 3, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = MemoryLoader(images, labels, batch_size, BatchTransform((0.5,) * 3, (0.25,) * 3), train=True, seed=3)
        loader.set_epoch(1)
        precision = Precision("fp32", "cpu")
        steps = len(loader) // accumulate
        step = engine.OptimizerStep(model, opt, Scheduler(opt, constant(1), steps), precision,
                                    settings=engine.StepSettings(accumulate=accumulate, grad_clip_norm=10.0))
        result, global_step = engine.train_one_epoch(step, loader, progress=False)
        assert global_step == steps
        return model[1].weight.detach()
    torch.testing.assert_close(train(8, 4), train(32, 1), rtol=1e-5, atol=1e-6)


def test_mixed_loss_is_cross_entropy_against_the_mixed_targets():
    mixer = Mixer(mixup_alpha=0.4, seed=1)
    mixer.set_epoch(1)
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8) % 3
    mixed = mixer(images, labels)
    assert 0 < mixed.lam < 1 and torch.equal(mixed.other, labels.roll(1))
    torch.testing.assert_close(mixed.images, mixed.lam * images + (1 - mixed.lam) * images.roll(1, 0))
    logits = torch.randn(8, 3)
    soft = mixed.lam * F.one_hot(labels, 3) + (1 - mixed.lam) * F.one_hot(labels.roll(1), 3)
    torch.testing.assert_close(mixed.loss(logits, 0.0), F.cross_entropy(logits, soft.float()))
    cutmix = Mixer(cutmix_alpha=1.0, seed=1)
    cutmix.set_epoch(1)
    boxed = cutmix(images, labels)
    changed = (boxed.images != images).any(1).float().mean((1, 2))  # share of each image's pixels replaced
    torch.testing.assert_close(changed, torch.full((8,), 1 - boxed.lam))


def test_ema_follows_the_weights_with_warmup():
    model = torch.nn.Linear(2, 1, bias=False)
    start = model.weight.detach().clone()
    ema = WeightEMA(model, decay=0.9, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()  # decay min(0.9, (1 + 0) / (10 + 0)) = 0.1
    expected = 0.1 * start + 0.9 * 1.0
    torch.testing.assert_close(ema.module.weight, expected)
    ema.update()  # decay min(0.9, 2 / 11)
    torch.testing.assert_close(ema.module.weight, 2 / 11 * expected + 9 / 11 * 1.0)
    restored = WeightEMA(torch.nn.Linear(2, 1, bias=False), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2 and torch.equal(restored.module.weight, ema.module.weight)


@pytest.mark.parametrize("timing,budget_s,elapsed,expected", [
    (budget.Timing(0.1, 100, 2.0, 5.0), 600, 20, 46),     # (600*0.97 - 20 - 5) / 12 = 46.4
    (budget.Timing(0.1, 100, 2.0, 5.0, 1.0), 600, 20, 42),  # with 1s of checkpoint writes an epoch
    (budget.Timing(1.0, 1000, 0.0, 0.0), 60, 10, 1),      # never fewer than one epoch
])
def test_time_budget_picks_the_epochs_that_fit(timing, budget_s, elapsed, expected):
    assert budget.epochs_within(budget_s, elapsed, timing) == expected


def test_time_budget_run_stores_its_choice(small_cifar_root, run_cli):
    (run_cli.cwd / "data").symlink_to(small_cifar_root)
    result = run_cli("resnet-train", *[a for a in FAST if not a.startswith("epochs")], "epochs=auto",
                     "time_budget=6s", "hydra.run.dir=budget")
    assert_ok(result)
    assert "time_budget=6s:" in result.stdout and "epochs (planned" in result.stdout
    ckpt = torch.load(run_cli.cwd / "budget" / "checkpoints" / "last.pt", weights_only=True)
    chosen = ckpt["config"]["epochs"]
    assert isinstance(chosen, int) and chosen >= 1 and ckpt["config"]["time_budget"] == "6s"
    assert metrics_of(run_cli.cwd / "budget")["epochs"] == chosen
    again = run_cli("resnet-train", "resume=budget", "epochs=auto", "time_budget=6s")  # the same command line
    assert again.returncode == 2 and f"has finished all {chosen} epochs" in again.stderr


def test_a_time_budget_below_one_epoch_warns(small_cifar_root, run_cli):
    (run_cli.cwd / "data").symlink_to(small_cifar_root)
    result = run_cli("resnet-train", *[a for a in FAST if not a.startswith("epochs")], "epochs=auto",
                     "time_budget=1s", "hydra.run.dir=budget")
    assert_ok(result)
    assert "time_budget=1s is too short for one epoch" in result.stdout + result.stderr
    assert metrics_of(run_cli.cwd / "budget")["epochs"] == 1


def test_ema_and_early_stopping_survive_kill_and_resume(small_cifar_root, tmp_path):
    user = Runner(tmp_path / "work")
    (user.cwd / "data").symlink_to(small_cifar_root)
    run = [*FAST, "epochs=5", "seed=4", "ema.decay=0.8", "early_stopping.patience=2", "early_stopping.metric=val_loss",
           "checkpoint.every_n_steps=4", "augment=trivialaugment", "mix.cutmix_alpha=1.0"]
    assert_ok(user("resnet-train", *run, "hydra.run.dir=reference"))
    kill(start_paused(user, "train_step@9", *run, "hydra.run.dir=killed"))  # mid-epoch 2, after a checkpoint
    assert_ok(user("resnet-train", "resume=killed"))
    a, b = (torch.load(user.cwd / d / "checkpoints" / "last.pt", weights_only=True) for d in ("reference", "killed"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]) and torch.equal(a["ema"]["weights"][key],
                                                                             b["ema"]["weights"][key]), key
    assert a["ema"]["updates"] == b["ema"]["updates"]
    for field in ("early_best", "early_bad_epochs", "stopped_early", "epoch", "best_epoch"):
        assert a["state"][field] == b["state"][field], field
    ma, mb = (json.loads(Path(user.cwd / d / "metrics.json").read_text()) for d in ("reference", "killed"))
    assert ma["test_accuracy"] == mb["test_accuracy"] and ma["stopped_early"] == mb["stopped_early"]


def test_a_run_stopped_early_says_it_cannot_be_extended(small_cifar_root, run_cli):
    (run_cli.cwd / "data").symlink_to(small_cifar_root)
    run = [*FAST, "epochs=4", "early_stopping.patience=1", "early_stopping.min_delta=10", "hydra.run.dir=run"]
    assert_ok(run_cli("resnet-train", *run))  # (no epoch can improve by 10: it stops after epoch 2)
    assert metrics_of(run_cli.cwd / "run")["stopped_early"] == 2
    again = run_cli("resnet-train", "resume=run", "epochs=8")
    assert again.returncode == 2 and "stopped early after epoch 2" in again.stderr and "epochs=N" not in again.stderr


def test_a_finished_run_trained_longer_keeps_its_early_stopping_count(small_cifar_root, run_cli):
    """Patience 3, nothing can improve after epoch 1: an uninterrupted run stops after epoch 4; so does
    a 3-epoch run resumed with epochs=6 (its last epoch counted too)."""
    (run_cli.cwd / "data").symlink_to(small_cifar_root)
    rule = ["early_stopping.patience=3", "early_stopping.min_delta=10"]
    run = [a for a in FAST if not a.startswith("epochs")]
    assert_ok(run_cli("resnet-train", *run, *rule, "epochs=3", "hydra.run.dir=run"))
    assert_ok(run_cli("resnet-train", "resume=run", "epochs=6"))
    assert metrics_of(run_cli.cwd / "run")["stopped_early"] == 4
    # patience used up exactly at a run's last epoch: an uninterrupted run would have stopped there
    assert_ok(run_cli("resnet-train", *run, *rule, "epochs=4", "hydra.run.dir=used_up"))
    again = run_cli("resnet-train", "resume=used_up", "epochs=6")
    assert again.returncode == 2 and "early stopping would have ended this run after its last epoch (4" in again.stderr
