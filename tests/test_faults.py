"""Nothing lost, nothing silently wrong: runs killed at every phase and resumed equal an uninterrupted
one; one run per directory; only finite state is saved; bad data, full disks and read-only folders
get one `error:` line. A run is paused at a named phase (RESNET_TRAIN_PAUSE_AT, resnet_train/pause.py)
so every kill lands where intended."""

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Runner, assert_ok, assert_one_error, events, metrics_of, write_image_folder
from PIL import Image

RUN = ["model=resnet20", "epochs=2", "batch_size=32", "log_every_n_steps=2", "num_workers=0", "seed=2",
       "dataset.val_size=40", "checkpoint.every_n_steps=4", "tensorboard.confusion_every_n_epochs=0",
       "tensorboard.mistakes=4"]
TIMING = {"wall_seconds", "images_per_second", "train_seconds", "epoch_seconds",
          "environment"}  # (not computed: each session's own, its command line resume=...)


@pytest.fixture(scope="module")
def user(small_cifar_root, module_tmp) -> Runner:
    runner = Runner(module_tmp / "user")
    (runner.cwd / "data").symlink_to(small_cifar_root)  # 200 training images: 6 steps an epoch
    return runner


@pytest.fixture(scope="module")
def reference(user) -> Path:
    assert_ok(user("resnet-train", *RUN, "hydra.run.dir=runs/reference"))
    return user.cwd / "runs" / "reference"


def start_paused(user: Runner, phase: str, *args: str) -> subprocess.Popen:
    """Start resnet-train with `args`, and return once it waits at `phase` (to be killed)."""
    proc = user.popen("resnet-train", *args, env={"RESNET_TRAIN_PAUSE_AT": phase})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"paused at {phase}"):
            return proc
    proc.wait()
    raise AssertionError(f"the run ended (exit {proc.returncode}) before pausing at {phase}:\n{''.join(seen)}")


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """Weights, optimizer state, every number in metrics.json and every TensorBoard value at every
    step (each step once) equal the uninterrupted run's."""
    for name in ("last", "best"):
        a, b = (torch.load(d / "checkpoints" / f"{name}.pt", weights_only=True) for d in (reference, run_dir))
        assert a["state"]["epoch"] == b["state"]["epoch"] and a["state"]["best_epoch"] == b["state"]["best_epoch"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
        for pid, state in a["optimizer"]["state"].items():
            assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"]), name
    assert without_timing(metrics_of(run_dir)) == without_timing(metrics_of(reference))
    ref, got = events(reference), events(run_dir)
    tags = [t for t in ref.Tags()["scalars"] if not t.startswith("throughput")]
    assert set(tags) <= set(got.Tags()["scalars"]) and "metrics/test_accuracy" in tags
    for tag in tags:
        assert [(e.step, e.value) for e in got.Scalars(tag)] == [(e.step, e.value) for e in ref.Scalars(tag)], tag
    assert {"test/confusion_matrix", "test/most_confident_mistakes"} <= set(got.Tags()["images"])
    for tag in ("test/confusion_matrix", "test/most_confident_mistakes"):
        assert len(got.Images(tag)) == 1, tag
    assert not list(run_dir.rglob("*.tmp")), "temporary files were left behind"


PHASES = ["train_step@5", "checkpoint_write@2", "validation@1", "best_update@1", "validation@2", "final_test", "exit"]


@pytest.mark.parametrize("phase", PHASES)
def test_killed_at_any_phase_then_resumed_equals_an_uninterrupted_run(reference, user, phase):
    run = f"runs/{phase.replace('@', '-')}"
    kill(start_paused(user, phase, *RUN, f"hydra.run.dir={run}"))
    result = user("resnet-train", f"resume={run}")
    if phase == "exit":  # everything was written before the kill: nothing left to do
        assert_one_error(result, "has finished all 2 epochs")
    else:
        assert_ok(result)
    assert_same_run(reference, user.cwd / run)


# The same battery streamed from an image folder by a worker process, with the random draws that
# live outside the data order: dropout (the global generator), EMA, a per-image policy and MixUp.
STREAMED = ["dataset=image_folder", "dataset.root=photos", "dataset.loader=stream", "dataset.val_size=40",
            "num_workers=1", "model.dropout=0.5", "ema.decay=0.9", "augment=randaugment", "mix.mixup_alpha=0.2"]


@pytest.fixture(scope="module")
def streamed_reference(user) -> Path:
    write_image_folder(user.cwd / "photos", {"train": 232, "test": 40}, num_classes=4)
    assert_ok(user("resnet-train", *RUN, *STREAMED, "hydra.run.dir=runs/streamed-reference"))
    return user.cwd / "runs" / "streamed-reference"


@pytest.mark.parametrize("phase", PHASES)
def test_a_streamed_run_killed_at_any_phase_then_resumed_equals_an_uninterrupted_run(streamed_reference, user,
                                                                                        phase):
    """Killed with its decoding worker alive (the worker must not keep the run locked, nor the resume
    draw differently)."""
    run = f"runs/streamed-{phase.replace('@', '-')}"
    kill(start_paused(user, phase, *RUN, *STREAMED, f"hydra.run.dir={run}"))
    result = user("resnet-train", f"resume={run}")
    if phase == "exit":
        assert_one_error(result, "has finished all 2 epochs")
    else:
        assert_ok(result)
    assert_same_run(streamed_reference, user.cwd / run)
    ckpt, ref = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (user.cwd / run, streamed_reference))
    assert all(torch.equal(ckpt["ema"]["weights"][k], w) for k, w in ref["ema"]["weights"].items())
    assert torch.equal(ckpt["rng"][0]["torch"], ref["rng"][0]["torch"])  # (dropout draws from it)


def test_a_run_killed_before_its_first_checkpoint_starts_again(reference, user):
    for how in ("same command", "resume"):
        run = f"runs/early-{how.replace(' ', '-')}"
        kill(start_paused(user, "train_step@1", *RUN, f"hydra.run.dir={run}"))
        assert not (user.cwd / run / "checkpoints" / "last.pt").exists()
        args = [*RUN, f"hydra.run.dir={run}"] if how == "same command" else [f"resume={run}"]
        assert_ok(user("resnet-train", *args))
        assert_same_run(reference, user.cwd / run)
    other = user("resnet-train", *RUN, "optim.lr=0.05", "hydra.run.dir=runs/early-resume")
    assert_one_error(other, "already holds a run")  # (finished now; and a different command)


def test_one_run_per_directory(user):
    first = start_paused(user, "train_step@1", *RUN, "hydra.run.dir=runs/shared")
    try:
        second = user("resnet-train", *RUN, "optim.lr=0.01", "hydra.run.dir=runs/shared")
        assert_one_error(second, "is in use by another resnet-train process", f"pid {first.pid}")
        assert "lr: 0.01" not in (user.cwd / "runs/shared/.hydra/config.yaml").read_text()
    finally:
        kill(first)
    # started together: exactly one of three runs trains in the directory
    procs = [user.popen("resnet-train", *RUN, "epochs=1", "hydra.run.dir=runs/race") for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2, 2], outputs
    assert sum("Run dir:" in o for o in outputs) == 1
    refusals = [o for o, p in zip(outputs, procs) if p.returncode]
    assert all("is in use by another" in o or "already holds a run" in o for o in refusals)


def test_runs_started_in_the_same_second_get_their_own_default_dirs(small_cifar_root, tmp_path):
    """The default run dir is named by the second the command started in (outputs/<date>/<time>);
    when a run started in the same second has it, the next run takes <time>_2 instead of being
    refused. (The seconds around now are made to hold runs already, so the clock cannot dodge it.)"""
    user = Runner(tmp_path / "work")
    (user.cwd / "data").symlink_to(small_cifar_root)
    now = time.time()
    taken = [user.cwd / "outputs" / time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(now + s)) for s in range(-1, 30)]
    for run_dir in taken:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"a run's")
    result = user("resnet-train", *RUN, "epochs=1", "checkpoint.every_n_steps=0")
    assert_ok(result)
    made = [p.parent for p in (user.cwd / "outputs").glob("*/*/metrics.json")]
    assert len(made) == 1 and made[0].name.endswith("_2") and made[0].with_name(made[0].name[:-2]) in taken
    assert f"Results in outputs/{made[0].parent.name}/{made[0].name}" in result.stdout
    assert all((d / "checkpoints" / "last.pt").read_bytes() == b"a run's" for d in taken)


def test_two_resumes_of_one_run(user):
    kill(start_paused(user, "train_step@5", *RUN, "hydra.run.dir=runs/twice"))
    first = start_paused(user, "validation@1", "resume=runs/twice")
    try:
        assert_one_error(user("resnet-train", "resume=runs/twice"), "is in use by another resnet-train process")
    finally:
        kill(first)
    assert_ok(user("resnet-train", "resume=runs/twice"))  # the killed holder's lock does not block


def test_only_finite_state_is_ever_saved(user):
    result = user("resnet-train", *RUN, "optim.lr=1e4", "checkpoint.every_n_steps=1", "hydra.run.dir=runs/diverged")
    assert_one_error(result, "NaN/inf", "lower optim.lr")
    line = result.stderr
    names_it = "the last good checkpoint is" in line and "checkpoints/last.pt" in line
    assert names_it or "no checkpoint was written" in line
    for path in (user.cwd / "runs" / "diverged" / "checkpoints").glob("*.pt"):
        ckpt = torch.load(path, weights_only=True)
        tensors = list(ckpt["model"].values()) + [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path


def test_non_finite_checkpoints_are_refused_by_eval_and_predict(reference, user):
    ckpt = torch.load(reference / "checkpoints" / "best.pt", weights_only=True)
    ckpt["model"]["layer1.0.bn1.running_var"][0] = float("inf")
    torch.save(ckpt, user.cwd / "nan.pt")
    assert_one_error(user("resnet-eval", "checkpoint=nan.pt"), "nan.pt are not finite", "running_var")
    assert_one_error(user("resnet-predict", "checkpoint=nan.pt", "inputs=[nan.pt]"), "are not finite")


def test_a_pickle_with_code_is_refused_without_torchs_advice(user):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))
    torch.save({"model": Payload(), "config": {}, "classes": []}, user.cwd / "evil.pt")
    result = user("resnet-eval", "checkpoint=evil.pt")
    assert_one_error(result, "holds Python objects besides tensors", "GLOBAL")
    assert "weights_only" not in result.stderr and "this ran" not in result.stdout


# --------------------------------------------------------------------------------------------
# Data that is what it says
# --------------------------------------------------------------------------------------------


def image_folder(root: Path) -> Path:
    return write_image_folder(root, {"train": 48}, num_classes=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_named_in_one_line(tmp_path, workers):
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "airplane" / "broken.png").write_bytes(b"\x89PNG not really")
    user = Runner(tmp_path / "work")
    for loader in ("memory", "stream"):
        result = user("resnet-train", "model=resnet20", "dataset=image_folder", f"dataset.root={root}", "epochs=1",
                      "batch_size=8", f"num_workers={workers}", f"dataset.loader={loader}", "dataset.normalize=false")
        assert_one_error(result, "could not read image", "broken.png")


def test_empty_class_folders_and_a_single_class_are_refused(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "zebra").mkdir()
    user = Runner(tmp_path / "work")
    assert_one_error(user("resnet-train", "dataset=image_folder", f"dataset.root={root}"), "zebra has no images")
    shutil.rmtree(root / "train" / "zebra")
    shutil.rmtree(root / "train" / "automobile")
    assert_one_error(user("resnet-train", "dataset=image_folder", f"dataset.root={root}"),
                     "has one class (airplane)", "at least two")


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    from resnet_train.data import decode_resized
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "gray16.png")
    decoded = decode_resized(str(tmp_path / "gray16.png"), 64)
    assert torch.equal(decoded[0], torch.from_numpy((gradient >> 8).astype(np.uint8)))  # not 99.6% white
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(Exception, match="float.tif: floating-point pixels"):
        decode_resized(str(tmp_path / "float.tif"), 8)


# --------------------------------------------------------------------------------------------
# Full disks and read-only folders (a small tmpfs; needs root to mount)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def test_a_disk_filled_by_tensorboard_gets_one_line_naming_its_event_file(user, tmp_path):
    """40 KiB: TensorBoard's writer thread meets the full disk first. It used to print its own
    25-line traceback, then "a file" and the free space of another disk."""
    with mounted(tmp_path / "tiny", "40k") as disk:
        result = user("resnet-train", *RUN, f"hydra.run.dir={disk}/run")
        assert_one_error(result, f"could not write {disk}/run/events.out.tfevents.", "the disk is full (0 MiB free)")
        assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr


def test_a_full_disk_gets_one_line_and_keeps_the_last_checkpoint(user, tmp_path):
    with mounted(tmp_path / "small", "3m") as disk:
        result = user("resnet-train", *RUN, f"hydra.run.dir={disk}/run")
        assert_one_error(result, "the disk is full", f"{disk}/run")
        last = disk / "run" / "checkpoints" / "last.pt"
        if last.exists():  # the checkpoint written before the disk filled up is whole
            assert torch.load(last, weights_only=True)["state"]["global_step"] > 0
        assert not list((disk / "run").rglob("*.tmp"))


def test_read_only_folders_get_one_line(reference, user, tmp_path):
    with mounted(tmp_path / "ro", "64m") as disk:
        shutil.copytree(reference, disk / "run")
        (disk / "run" / "checkpoints" / "last.pt").write_bytes((reference / "checkpoints" / "last.pt").read_bytes())
        remount_read_only(disk)
        assert_one_error(user("resnet-train", *RUN, f"hydra.run.dir={disk}/new"), "read-only file system")
        assert_one_error(user("resnet-train", f"resume={disk}/run", "epochs=3"), "read-only file system")
        assert_one_error(user("resnet-eval", f"checkpoint={disk}/run"), "eval.json", "read-only file system")
        assert_one_error(user("resnet-predict", f"checkpoint={disk}/run", "inputs=[data]", f"output={disk}/p.csv"),
                         "p.csv", "read-only file system")
