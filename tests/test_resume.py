"""Runs you can trust: kill -9 and resume gives bitwise the same run, Ctrl-C/SIGTERM stop cleanly,
TensorBoard continues without duplicates, and bad checkpoints never damage a run dir."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RUN = ["model=resnet20", "epochs=3", "batch_size=32", "log_every_n_steps=4", "num_workers=0", "seed=1",
       "dataset.val_size=100", "checkpoint.every_n_steps=10", "tensorboard.images=false"]


def env(fake_md5_dir) -> dict:
    return subprocess_env(fake_md5_dir)


def train_cmd(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "resnet-train"), *args]


def last_state(run_dir: Path) -> dict | None:
    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_same_final_state(a: Path, b: Path) -> None:
    ca = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for pid, state in ca["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], cb["optimizer"]["state"][pid]["momentum_buffer"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "best_epoch"):
        assert ma[key] == mb[key], key
    assert [r["val_loss"] for r in ma["history"]] == [r["val_loss"] for r in mb["history"]]


@pytest.fixture(scope="module")
def reference_run(cifar_root, fake_md5_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one must match exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run(train_cmd(*RUN, f"dataset.root={cifar_root}", f"hydra.run.dir={run_dir}"),
                            env=env(fake_md5_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return run_dir


def start_run(cifar_root, fake_md5_dir, run_dir) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*RUN, f"dataset.root={cifar_root}", f"hydra.run.dir={run_dir}"),
                            env=env(fake_md5_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be interrupted"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def resume(fake_md5_dir, target, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(f"resume={target}", *args), env=env(fake_md5_dir), capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(reference_run, cifar_root, fake_md5_dir, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start_run(cifar_root, fake_md5_dir, run_dir)
    # a mid-epoch checkpoint of epoch 2 (every 10 steps; 28 steps per epoch)
    wait_for(lambda: (s := last_state(run_dir)) is not None and s["epoch"] == 1 and s["epoch_progress"], proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and last_state(run_dir)["epoch"] < 3

    result = resume(fake_md5_dir, run_dir)
    assert result.returncode == 0, result.stderr
    assert "Resuming from" in result.stdout
    assert_same_final_state(reference_run, run_dir)

    # TensorBoard: every step exactly once, with the uninterrupted run's values
    for tag in ("train/loss", "accuracy/val", "loss/train", "lr"):
        steps = [s for s, _ in scalars(run_dir, tag)]
        assert steps == sorted(set(steps)), tag
        assert scalars(run_dir, tag) == scalars(reference_run, tag), tag
    assert not (run_dir / ".hydra" / "config.yaml").read_text().count("resume: /")  # original record kept


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_graceful_stop_saves_and_says_how_to_resume(reference_run, cifar_root, fake_md5_dir, tmp_path, sig, code):
    run_dir = tmp_path / "stopped"
    proc = start_run(cifar_root, fake_md5_dir, run_dir)
    wait_for(lambda: (s := last_state(run_dir)) is not None and s["epoch"] >= 1, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert f"resnet-train resume={run_dir}" in output and "Traceback" not in output
    state = last_state(run_dir)
    assert state["epoch_progress"] is not None or state["epoch"] == 3
    if sig == signal.SIGTERM:  # (resuming after SIGKILL is tested above; once more here is enough)
        result = resume(fake_md5_dir, run_dir)
        assert result.returncode == 0, result.stderr
        assert_same_final_state(reference_run, run_dir)


def test_resume_latest_with_more_epochs(cifar_root, fake_md5_dir, tmp_path):
    base = [a for a in RUN if not a.startswith("epochs=")]
    first = subprocess.run(train_cmd(*base, "epochs=1", f"dataset.root={cifar_root}"), env=env(fake_md5_dir),
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    result = resume(fake_md5_dir, "latest", "epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "outputs").glob("*/*/checkpoints"))
    assert len(runs) == 1  # continued in place, no second run dir
    metrics = json.loads((runs[0].parent / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert torch.load(runs[0] / "last.pt", weights_only=True)["config"]["epochs"] == 2


def snapshot(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.name.endswith(".log")}


@pytest.mark.parametrize("args,message", [
    (["model=resnet32"], "model=resnet32: cannot change when resuming"),
    (["optim.lr=0.5"], "optim.lr=0.5: cannot change when resuming"),
    (["batch_size=64"], "batch_size=64: cannot change when resuming"),
    (["epochs=2"], "has finished all 3 epochs"),
])
def test_resume_refuses_changes_to_the_run(reference_run, fake_md5_dir, tmp_path, args, message):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    before = snapshot(run_dir)
    result = resume(fake_md5_dir, run_dir, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage,message", [
    ("missing", "no checkpoint at"),
    ("truncated", "not a readable checkpoint"),
    ("not_ours", "not a resnet-train checkpoint"),
    ("other_model", "do not fit this model"),
    ("other_classes", "do not fit this model"),
])
def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(reference_run, run_cli, fake_md5_dir, tmp_path,
                                                               damage, message):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if damage == "missing":
        last.unlink()
        (run_dir / "checkpoints" / "best.pt").unlink()
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "not_ours":
        torch.save({"weights": torch.zeros(3)}, last)
    else:
        ckpt = torch.load(last, weights_only=True)
        if damage == "other_model":
            ckpt["config"]["model"]["_target_"] = "resnet_train.models.resnet32"
        else:
            ckpt["classes"] = ckpt["classes"][:5]
            ckpt["model"]["fc.weight"] = ckpt["model"]["fc.weight"][:5]
            ckpt["model"]["fc.bias"] = ckpt["model"]["fc.bias"][:5]
        torch.save(ckpt, last)
    before = snapshot(run_dir)
    result = resume(fake_md5_dir, last if damage != "missing" else run_dir)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one line
    assert snapshot(run_dir) == before
    if damage in ("other_model", "other_classes"):  # (resnet-eval's own bad-file cases are in test_cli)
        evaluated = run_cli("resnet-eval", f"checkpoint={last}")
        assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr
        assert snapshot(run_dir) == before


def test_diverging_run_stops_with_the_step_and_writes_no_nan_weights(cifar_root, run_cli, tmp_path):
    run_dir = tmp_path / "nan"
    result = run_cli("resnet-train", *RUN, "optim.lr=1e12", f"dataset.root={cifar_root}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "NaN/inf at step" in result.stderr and "learning rate" in result.stderr
    best = run_dir / "checkpoints" / "best.pt"
    if best.exists():
        assert all(torch.isfinite(t).all() for t in torch.load(best, weights_only=True)["model"].values()
                   if t.is_floating_point())
