"""Runs you can trust: kill -9 and resume gives bitwise the same run, Ctrl-C/SIGTERM stop cleanly,
the natural resume command line is accepted, and bad checkpoints never damage a run dir."""

import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import Runner, assert_ok, assert_one_error, metrics_of

# (test_faults.py kills runs at every phase; here: signals, the resume command line, bad checkpoints)
RUN = ["model=resnet20", "epochs=3", "batch_size=32", "log_every_n_steps=2", "num_workers=0", "seed=1",
       "dataset.val_size=40", "checkpoint.every_n_steps=4", "tensorboard.images=false"]


def last_state(run_dir: Path) -> dict | None:
    """The state in last.pt, or None while there is none. (Atomic writes: never a torn file.)"""
    path = run_dir / "checkpoints" / "last.pt"
    return torch.load(path, weights_only=True)["state"] if path.exists() else None


def assert_same_final_state(a: Path, b: Path) -> None:
    ca = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for pid, state in ca["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], cb["optimizer"]["state"][pid]["momentum_buffer"])
    ma, mb = metrics_of(a), metrics_of(b)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "best_epoch"):
        assert ma[key] == mb[key], key
    assert [r["val_loss"] for r in ma["history"]] == [r["val_loss"] for r in mb["history"]]


@pytest.fixture(scope="module")
def user(small_cifar_root, module_tmp) -> Runner:
    """A user's working directory with the generated CIFAR-10 in ./data (the default dataset.root)."""
    runner = Runner(module_tmp / "user")
    (runner.cwd / "data").symlink_to(small_cifar_root)
    return runner


@pytest.fixture(scope="module")
def reference_run(user) -> Path:
    """The uninterrupted run every interrupted one must match exactly."""
    assert_ok(user("resnet-train", *RUN, "hydra.run.dir=runs/reference"))
    return user.cwd / "runs" / "reference"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_graceful_stop_saves_and_says_how_to_resume(reference_run, user, sig, code):
    name = f"stopped {sig.name}"  # (a space: the printed command must paste into a shell as it is)
    run_dir = user.cwd / "runs" / name
    proc = user.popen("resnet-train", *RUN, f"hydra.run.dir=runs/{name}",
                      env={"RESNET_TRAIN_PAUSE_AT": "train_step@9", "RESNET_TRAIN_PAUSE_SECONDS": "5"})
    _until_paused(proc)
    proc.send_signal(sig)  # while it waits after step 9: it stops after that step, mid-epoch 2
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    printed = next(line.strip() for line in output.splitlines() if line.strip().startswith("resnet-train "))
    assert printed == "resnet-train " + shlex.quote(f"resume=runs/{name}") and "Traceback" not in output  # relative
    state = last_state(run_dir)
    assert state["global_step"] == 9 and state["epoch_progress"]["step"] == 3
    if sig == signal.SIGTERM:  # resume exactly as the message says, with the original command line too
        assert_ok(user("resnet-train", *RUN, *shlex.split(printed)[1:]))
        assert_same_final_state(reference_run, run_dir)


def _until_paused(proc) -> bool:
    for line in proc.stdout:
        if line.startswith("paused at"):
            return True
    raise AssertionError(f"exit {proc.wait()} before pausing")


def test_resume_latest_from_last_pt_with_more_epochs(user, tmp_path):
    runner = Runner(tmp_path / "work")
    (runner.cwd / "data").symlink_to(user.cwd / "data")
    base = [a for a in RUN if not a.startswith("epochs=")]
    assert_ok(runner("resnet-train", *base, "epochs=1"))
    assert_ok(runner("resnet-train", "resume=latest", "epochs=2"))
    runs = list((runner.cwd / "outputs").glob("*/*/checkpoints"))
    assert len(runs) == 1  # continued in place, no second run dir
    run_dir = runs[0].parent
    assert metrics_of(run_dir)["epochs"] == 2 and [r["epoch"] for r in metrics_of(run_dir)["history"]] == [1, 2]
    relative = run_dir.relative_to(runner.cwd)
    result = runner("resnet-train", *base, f"resume={relative}/checkpoints/last.pt", "epochs=3",
                    f"hydra.run.dir={relative}")  # the original command, the run dir repeated, a .pt file
    assert_ok(result)
    assert torch.load(runs[0] / "last.pt", weights_only=True)["config"]["epochs"] == 3


def test_a_resume_reads_its_checkpoint_once_before_training(reference_run, user, tmp_path, monkeypatch):
    """The run is planned once: the checks before the run read last.pt, and training starts from
    what they read (torch.load counted up to the first training step)."""
    from resnet_train import pause
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    loaded, before_training = [], []
    real_load, real_point = torch.load, pause.point
    def load(f, *args, **kwargs):
        loaded.append(Path(f).name if isinstance(f, (str, Path)) else "a buffer")
        return real_load(f, *args, **kwargs)
    monkeypatch.setattr(torch, "load", load)

    def point(name: str) -> None:
        if name == "train_step" and not before_training:
            before_training.append(list(loaded))
        real_point(name)
    monkeypatch.setattr(pause, "point", point)
    assert_ok(user("resnet-train", f"resume={run_dir}", "epochs=4"))
    assert before_training and before_training[0].count("last.pt") == 1, before_training


def snapshot(run_dir: Path) -> dict:
    """Every result file of a run (not its log, nor the lock file's pid)."""
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("train.log", ".lock")}


@pytest.mark.parametrize("args,message", [
    (["model=resnet32"], "model: the run has resnet20, the command line gives resnet32"),
    (["optim.lr=0.5"], "optim.lr: the run has 0.1, the command line gives 0.5"),
    (["batch_size=64"], "batch_size: the run has 32, the command line gives 64"),
    (["optim=adam"], "optim: the run has SGD, the command line gives Adam"),
    (["epochs=2"], "has finished all 3 epochs"),
    (["hydra.run.dir=elsewhere"], "resume= continues in the checkpoint's own run dir"),
])
def test_resume_refuses_changes_to_the_run(reference_run, user, tmp_path, args, message):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    before = snapshot(run_dir)
    assert_one_error(user("resnet-train", f"resume={run_dir}", *args), message)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage,message", [
    ("missing", "no checkpoint at"),
    ("truncated", "not a readable checkpoint"),
    ("not_ours", "not a resnet-train checkpoint"),
    ("other_model", "do not fit this model"),
    ("other_classes", "do not fit this data: they were trained on classes 5 (airplane"),
])
def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(reference_run, user, tmp_path, damage, message):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if damage == "missing":
        shutil.rmtree(run_dir / "checkpoints")
        shutil.rmtree(run_dir / ".hydra")
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
    more = ["epochs=4"] if damage == "other_classes" else []  # (fits its own config: found when the data is read)
    assert_one_error(user("resnet-train", f"resume={last if damage != 'missing' else run_dir}", *more), message)
    assert snapshot(run_dir) == before
    if damage in ("other_model", "other_classes"):  # (resnet-eval's own bad-file cases are in test_cli)
        assert_one_error(user("resnet-eval", f"checkpoint={last}"), "do not fit this")
        assert snapshot(run_dir) == before


def test_resume_auto_starts_then_continues_with_the_same_command(reference_run, user):
    """`resume=auto` is one command line for a launcher that reruns it: the first start trains from
    scratch, a rerun after kill -9 continues from last.pt, and the run ends as if never stopped."""
    command = [*RUN, "hydra.run.dir=runs/auto", "resume=auto"]
    proc = user.popen("resnet-train", *command, env={"RESNET_TRAIN_PAUSE_AT": "train_step@10"})
    _until_paused(proc)
    proc.kill()
    proc.wait()
    assert last_state(user.cwd / "runs" / "auto")["global_step"] == 8  # (checkpoint.every_n_steps=4)
    result = user("resnet-train", *command)
    assert_ok(result)
    assert "Resuming from" in result.stdout
    assert_same_final_state(reference_run, user.cwd / "runs" / "auto")
    assert_one_error(user("resnet-train", *RUN, "resume=auto"), "resume=auto starts or continues the run in "
                     "hydra.run.dir: give one")


def test_resume_auto_restarts_an_unstarted_run_in_place(user, tmp_path):
    """Killed before its first checkpoint: the rerun starts it again in the same dir (no refusal)."""
    command = [*RUN, "epochs=1", "hydra.run.dir=runs/unstarted", "resume=auto"]
    proc = user.popen("resnet-train", *command, env={"RESNET_TRAIN_PAUSE_AT": "train_step@1"})
    _until_paused(proc)
    proc.kill()
    proc.wait()
    assert last_state(user.cwd / "runs" / "unstarted") is None
    assert_ok(user("resnet-train", *command))
    assert metrics_of(user.cwd / "runs" / "unstarted")["epochs"] == 1
