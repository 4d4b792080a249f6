"""Comparing runs: sweeps with a summary (also in the default, relative sweep dir), job dirs named by
the swept keys, HParams per run, images and histograms in TensorBoard."""

import csv
import io
import textwrap

import pytest
from conftest import Runner, assert_ok, assert_one_error, events
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2

# 200 training images (small_cifar_root): 3 steps a job; what a sweep does with its jobs, not how well they learn.
BASE = ["model=resnet20", "epochs=1", "batch_size=64", "dataset.val_size=40", "num_workers=0"]


def hparams_of(acc) -> dict:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: (v.string_value or v.number_value) for k, v in info.hparams.items()}


def hparam_order(acc) -> list[str]:
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return [h.name for h in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.hparam_infos]


@pytest.fixture(scope="module")
def grid_sweep(small_cifar_root, module_tmp):
    """The README's sweep as typed: the default sweep dir (multirun/<date>/<time>, relative)."""
    user = Runner(module_tmp / "user")
    (user.cwd / "data").symlink_to(small_cifar_root)
    result = user("resnet-train", "-m", *BASE, "optim=sgd,adam", "optim.lr=0.05,0.02",
                  "tensorboard.histograms_every_n_epochs=1")
    assert_ok(result)
    sweep_dirs = list((user.cwd / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 1
    return sweep_dirs[0], result


def test_a_2x2_sweep_gives_four_runs_named_by_the_swept_keys_and_a_summary(grid_sweep):
    sweep_dir, result = grid_sweep
    names = sorted(p.parent.name for p in sweep_dir.glob("*/metrics.json"))
    assert names == sorted(f"optim={o},optim.lr={lr}" for o in ("sgd", "adam") for lr in ("0.05", "0.02"))
    seen = set()
    for name in names:
        acc = events(sweep_dir / name)
        hp = hparams_of(acc)
        assert hparam_order(acc)[:2] == ["optim", "optim.lr"]  # the swept keys first
        assert hp["optim"] in ("SGD", "Adam") and hp["optim.lr"] in (0.05, 0.02) and hp["model"] == "resnet20"
        assert hp["precision"] in ("bf16", "fp32") and hp["epochs"] == 1 and hp["batch_size"] == 64
        seen.add((hp["optim"], hp["optim.lr"]))
        assert "metrics/best_val_accuracy" in acc.Tags()["scalars"]
    assert len(seen) == 4

    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    accuracies = [float(r["best_val_accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {r["overrides"] for r in rows} == set(names) and {r["job_dir"] for r in rows} == set(names)
    assert "| overrides | best val acc | test acc |" in result.stdout and result.stdout.count("| optim=") == 4
    assert f"Sweep summary (multirun/{sweep_dir.parent.name}/{sweep_dir.name}/summary.csv)" in result.stdout
    assert "Warning" not in result.stderr and "raised" not in result.stderr


def test_images_and_histograms(grid_sweep):
    sweep_dir, _ = grid_sweep
    acc = events(next(sweep_dir.glob("optim=sgd*")))
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


def test_a_failing_job_is_reported_and_the_others_still_run(small_cifar_root, run_cli):
    result = run_cli("resnet-train", "-m", *BASE, f"dataset.root={small_cifar_root}", "optim.lr=0.05,nan,0.02",
                     "tensorboard.images=false", "hydra.sweep.dir=sweep")
    assert result.returncode == 2
    rows = list(csv.DictReader((run_cli.cwd / "sweep" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["overrides"] == "optim.lr=nan" and "optim.lr=nan is invalid" in rows[2]["error"]
    assert all(float(r["best_val_accuracy"]) > 0 for r in rows[:2])
    assert result.stderr.strip().splitlines() == [
        "error: 1 of 3 sweep jobs failed (every job ran; see the summary above); "
        "optim.lr=nan: optim.lr=nan is invalid: expected a positive number"]
    # the same sweep dir again: its summary and exit status are the new sweep's, not the old failed job's
    again = run_cli("resnet-train", "-m", *BASE, f"dataset.root={small_cifar_root}", "optim.lr=0.03",
                    "tensorboard.images=false", "hydra.sweep.dir=sweep")
    assert_ok(again)
    rows = list(csv.DictReader((run_cli.cwd / "sweep" / "summary.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and "optim.lr=0.03" in rows[0]["overrides"]
    # the same sweep into the same dir: refused before any job starts, the earlier runs kept as they were
    ok_run = run_cli.cwd / "sweep" / "optim.lr=0.05"
    before = {p.name: p.stat().st_mtime_ns for p in ok_run.rglob("*") if p.is_file()}
    result = run_cli("resnet-train", "-m", *BASE, f"dataset.root={small_cifar_root}", "optim.lr=0.05,nan,0.02",
                     "tensorboard.images=false", "hydra.sweep.dir=sweep")
    assert result.returncode == 2 and "Launching" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: sweep/optim.lr=0.05 already holds a run (and 1 more job dir(s)); choose a new hydra.sweep.dir "
        "so nothing there is overwritten, or continue the sweep with resume=auto"]
    assert {p.name: p.stat().st_mtime_ns for p in ok_run.rglob("*") if p.is_file()} == before


def test_out_of_memory_fails_only_its_job(small_cifar_root, tmp_path):
    """A job that runs out of device memory fails like any other bad job; the sweep goes on."""
    hook = tmp_path / "oom_hook.py"
    hook.write_text(textwrap.dedent("""
        import torch, torch.nn.functional as F
        real = F.cross_entropy
        def cross_entropy(logits, labels, *args, **kwargs):
            if logits.requires_grad and len(labels) == 64:  # training steps of the batch_size=64 job
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(logits, labels, *args, **kwargs)
        F.cross_entropy = cross_entropy
    """))
    user = Runner(tmp_path / "work", RESNET_TRAIN_TEST_HOOK=str(hook))
    result = user("resnet-train", "-m", *[a for a in BASE if not a.startswith("batch_size")], "batch_size=64,32",
                  f"dataset.root={small_cifar_root}", "tensorboard.images=false", "hydra.sweep.dir=sweep")
    assert result.returncode == 2, result.stderr
    rows = list(csv.DictReader((user.cwd / "sweep" / "summary.csv").open()))
    assert [(r["overrides"], r["status"]) for r in rows] == [("batch_size=32", "ok"), ("batch_size=64", "failed")]
    assert rows[1]["error"] == "out of memory on the device with batch_size=64; try batch_size=32"
    assert result.stderr.strip().splitlines()[-1] == ("error: 1 of 2 sweep jobs failed (every job ran; see the "
                                                      f"summary above); batch_size=64: {rows[1]['error']}")


def test_a_sweep_of_one_failing_job_still_writes_its_summary(run_cli):
    result = run_cli("resnet-train", "-m", *BASE, "optim.lr=nan", "hydra.sweep.dir=one")
    assert result.returncode == 2
    rows = list(csv.DictReader((run_cli.cwd / "one" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed"] and "optim.lr=nan is invalid" in rows[0]["error"]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: 1 of 1 sweep jobs failed")


def test_a_sweep_dir_that_cannot_be_written_is_one_line(run_cli):
    (run_cli.cwd / "taken").write_text("a file, not a folder")
    result = run_cli("resnet-train", "-m", *BASE, "optim.lr=0.05,0.02", "hydra.sweep.dir=taken")
    assert result.returncode == 2 and "Launching" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: could not write {run_cli.cwd.resolve() / 'taken' / 'sweep.json'}: "
        f"{run_cli.cwd.resolve() / 'taken'} is a file, not a folder"]


def test_a_bug_in_a_sweep_job_keeps_its_traceback(small_cifar_root, tmp_path):
    """Only user errors become the sweep's one line; anything else is a bug and shows where it is."""
    hook = tmp_path / "bug_hook.py"
    hook.write_text(textwrap.dedent("""
        import torch.nn.functional as F
        real = F.cross_entropy
        def cross_entropy(logits, labels, *args, **kwargs):
            if len(labels) == 64:
                raise KeyError("a bug")
            return real(logits, labels, *args, **kwargs)
        F.cross_entropy = cross_entropy
    """))
    user = Runner(tmp_path / "work", RESNET_TRAIN_TEST_HOOK=str(hook))
    result = user("resnet-train", "-m", *[a for a in BASE if not a.startswith("batch_size")], "batch_size=64,32",
                  f"dataset.root={small_cifar_root}", "tensorboard.images=false", "hydra.sweep.dir=sweep")
    assert result.returncode not in (0, 2)
    assert "Traceback" in result.stderr and "KeyError: 'a bug'" in result.stderr


def test_optuna_search(small_cifar_root, run_cli):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_cli("resnet-train", "hparams_search=optuna", *BASE, "tensorboard.images=false",
                     f"dataset.root={small_cifar_root}", "hydra.sweep.dir=optuna", "hydra.sweeper.n_trials=2")
    assert_ok(result)
    rows = list(csv.DictReader((run_cli.cwd / "optuna" / "summary.csv").open()))
    assert len(rows) == 2 and all("optim.lr=" in r["overrides"] and "label_smoothing=" in r["overrides"] for r in rows)
    best = (run_cli.cwd / "optuna" / "optimization_results.yaml").read_text()
    assert f"best_value: {max(float(r['best_val_accuracy']) for r in rows)}" in best


def test_optuna_search_goes_on_past_failed_trials(small_cifar_root, run_cli):
    """A trial that diverges is a failed trial (Optuna's FAIL), the search runs all n_trials, writes
    its results from the trials that finished, and says how many failed in its last line (exit 2);
    the search space is given on the command line as the README types it."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    search = ["hparams_search=optuna", *BASE, "tensorboard.images=false", f"dataset.root={small_cifar_root}"]
    result = run_cli("resnet-train", *search, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=mixed",
                     "optim.lr=tag(log, interval(5e-16, 2e17))")
    rows = list(csv.DictReader((run_cli.cwd / "mixed" / "summary.csv").open()))
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(rows) == 3 and 0 < len(failed) < 3  # (the sampler's seed puts 2 of the 3 lrs above 100)
    assert_search_error(result, f"{len(failed)} of 3 trials failed (the search ran them all; "
                                f"optimization_results.yaml holds the best of the {3 - len(failed)} that finished)")
    assert "best_value:" in (run_cli.cwd / "mixed" / "optimization_results.yaml").read_text()
    result = run_cli("resnet-train", *search, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=diverged",
                     "optim.lr=interval(1e10, 1e12)")
    assert_search_error(result, "all 2 trials of the search failed (see the summary above)")
    assert "Traceback" not in result.stderr
    assert_one_error(run_cli("resnet-train", *search, "hydra.sweeper.params.optim.lr=0.1"),
                     "a search space is given as a sweep of the key itself: 'optim.lr=tag(log, interval(")


def assert_search_error(result, fragment: str) -> None:
    """Exit 2 and one `error:` line (Optuna logs its own study line on stderr beside it)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr


def test_a_stopped_sweep_is_summarized_and_continued_with_resume_auto(small_cifar_root, tmp_path):
    """SIGTERM during the second of three jobs (a cluster preempting the sweep): the job saves, the
    sweep ends (143) with a summary of what ran; the same command with resume=auto keeps the
    finished job, resumes the stopped one from its checkpoint and runs the third: each listed once."""
    import signal

    user = Runner(tmp_path)
    sweep = ["-m", *BASE, "tensorboard.images=false", f"dataset.root={small_cifar_root}", "optim.lr=0.1,0.05,0.02",
             "hydra.sweep.dir=stopped"]  # (3 steps a job: the second job's 2nd step is the 5th)
    proc = user.popen("resnet-train", *sweep, env={"RESNET_TRAIN_PAUSE_AT": "train_step@5",
                                                  "RESNET_TRAIN_PAUSE_SECONDS": "60"})
    for line in proc.stdout:
        if line.startswith("paused at"):
            break
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    rows = {r["overrides"]: r["status"] for r in csv.DictReader((tmp_path / "stopped" / "summary.csv").open())}
    assert rows == {"optim.lr=0.1": "ok", "optim.lr=0.05": "stopped"}
    kept = (tmp_path / "stopped" / "optim.lr=0.1" / "metrics.json").read_text()
    assert_one_error(user("resnet-train", *sweep), "already holds a run", "continue the sweep with resume=auto")
    result = user("resnet-train", *sweep, "resume=auto")
    assert_ok(result)
    rows = list(csv.DictReader((tmp_path / "stopped" / "summary.csv").open()))
    assert sorted(r["overrides"] for r in rows) == ["optim.lr=0.02", "optim.lr=0.05", "optim.lr=0.1"]
    assert all(r["status"] == "ok" for r in rows)
    assert (tmp_path / "stopped" / "optim.lr=0.1" / "metrics.json").read_text() == kept  # not trained again
    assert "Resuming from" in (tmp_path / "stopped" / "optim.lr=0.05" / "train.log").read_text()
