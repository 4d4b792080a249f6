"""Comparing runs: sweeps with a summary, HParams per run, images and histograms in TensorBoard."""

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

BASE = ["model=resnet20", "epochs=1", "batch_size=64", "dataset.val_size=100", "num_workers=0"]


def sweep(fake_md5_dir, cifar_root, sweep_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "resnet-train"), "-m", *BASE,
                           f"dataset.root={cifar_root}", f"hydra.sweep.dir={sweep_dir}", *args],
                          env=subprocess_env(fake_md5_dir),
                          capture_output=True, text=True, timeout=300)


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_of(acc: EventAccumulator) -> dict:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: (v.string_value or v.number_value) for k, v in info.hparams.items()}


@pytest.fixture(scope="module")
def grid_sweep(cifar_root, fake_md5_dir, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "grid"
    result = sweep(fake_md5_dir, cifar_root, sweep_dir, "optim=sgd,adam", "optim.lr=0.05,0.02",
                   "tensorboard.histograms_every_n_epochs=1")
    assert result.returncode == 0, result.stderr
    return sweep_dir, result


def test_a_2x2_sweep_gives_four_named_runs_and_a_summary(grid_sweep):
    sweep_dir, result = grid_sweep
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert len(job_dirs) == 4
    assert {tuple(sorted(o for o in p.name.split(",") if o.startswith("optim"))) for p in job_dirs} == {
        (f"optim.lr={lr}", f"optim={o}") for o in ("sgd", "adam") for lr in ("0.05", "0.02")}  # named by overrides
    seen = set()
    for job_dir in job_dirs:
        acc = events(job_dir)
        hp = hparams_of(acc)
        assert hp["optim"] in ("SGD", "Adam") and hp["optim.lr"] in (0.05, 0.02) and hp["model"] == "resnet20"
        assert hp["precision"] in ("bf16", "fp32") and hp["epochs"] == 1 and hp["batch_size"] == 64
        seen.add((hp["optim"], hp["optim.lr"]))
        assert "metrics/best_val_accuracy" in acc.Tags()["scalars"]
    assert len(seen) == 4

    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    accuracies = [float(r["best_val_accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {r["overrides"] for r in rows} == {f"optim={o},optim.lr={lr}" for o in ("sgd", "adam") for lr in ("0.05", "0.02")}
    assert "| overrides | best val acc | test acc |" in result.stdout and result.stdout.count("| optim=") == 4


def test_images_and_histograms(grid_sweep):
    sweep_dir, _ = grid_sweep
    acc = events(next(sweep_dir.glob("*optim=sgd*")))
    tags = acc.Tags()
    assert {"train/augmented_samples", "val/confusion_matrix", "test/confusion_matrix",
            "test/most_confident_mistakes"} <= set(tags["images"])
    grid = Image.open(io.BytesIO(acc.Images("train/augmented_samples")[0].encoded_image_string))
    assert grid.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 images of 32px, 8 per row, 2px padding
    for tag in ("val/confusion_matrix", "test/most_confident_mistakes"):
        image = Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string))
        assert min(image.size) > 200
    assert {f"val_class_accuracy/{c}" for c in ("airplane", "truck")} <= set(tags["scalars"])
    assert "weights/fc.weight" in tags["histograms"] and "gradients/layer1.0.conv1.weight" in tags["histograms"]


def test_a_failing_job_is_reported_and_the_others_still_run(cifar_root, fake_md5_dir, tmp_path):
    sweep_dir = tmp_path / "failing"
    result = sweep(fake_md5_dir, cifar_root, sweep_dir, "optim.lr=0.05,nan,0.02", "tensorboard.images=false")
    assert result.returncode != 0
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["overrides"] == "optim.lr=nan" and "optim.lr=nan is invalid" in rows[2]["error"]
    assert all(float(r["best_val_accuracy"]) > 0 for r in rows[:2])


def test_optuna_search(cifar_root, fake_md5_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    result = subprocess.run([str(Path(sys.executable).parent / "resnet-train"), "hparams_search=optuna", *BASE,
                             "tensorboard.images=false", f"dataset.root={cifar_root}",
                             f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=2"],
                            env=subprocess_env(fake_md5_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 2 and all("optim.lr=" in r["overrides"] and "label_smoothing=" in r["overrides"] for r in rows)
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {max(float(r['best_val_accuracy']) for r in rows)}" in best
