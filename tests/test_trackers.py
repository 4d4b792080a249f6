"""Trackers beside TensorBoard hold what TensorBoard holds: a real `mlflow server` (SQLite store) read
back through MLflow's client, W&B in offline mode read back from its run files, the CSV file; for a
run killed after it sent steps its checkpoint does not hold and resumed, every step exactly once.
The environment travels with every result. A tracker that cannot be used is one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import Runner, assert_ok, assert_one_error, events, metrics_of

from resnet_train.config import validate
from resnet_train.errors import ConfigError
from resnet_train.trackers import wandb_history, wandb_records

RUN = ["model=resnet20", "epochs=2", "batch_size=32", "log_every_n_steps=2", "num_workers=0", "seed=3",
       "dataset.val_size=40", "tensorboard.images=false", "progress=false"]
TIMING_TAGS = ("throughput/",)  # measured, not computed: differs between runs
ENVIRONMENT_KEYS = {"torch", "torchvision", "cuda", "cudnn", "device_name", "cpu", "cpu_flags", "python",
                    "resnet_train", "git_commit", "hostname", "command"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store, answering when constructed."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "server.log", "w")
        mlflow = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--host", "127.0.0.1",
             "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
             "--artifacts-destination", str(folder / "artifacts")],
            cwd=folder, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
            if self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"mlflow server did not answer:\n{(folder / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # (its own session: the server and its workers)
            self.process.wait()
        self.log.close()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def run_named(self, name: str):
        client = self.client()
        experiment = client.get_experiment_by_name("resnet-train")
        found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
        assert len(found) == 1, [r.info.run_name for r in found]
        return found[0]

    def history(self, name: str) -> dict[str, list[tuple[int, float]]]:
        """tag -> [(step, value)] of the run called `name`, in step order."""
        client, run = self.client(), self.run_named(name)
        return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics}


@pytest.fixture(scope="module")
def mlflow_server(module_tmp) -> MlflowServer:
    server = MlflowServer(module_tmp / "mlflow")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def user(small_cifar_root, module_tmp) -> Runner:
    runner = Runner(module_tmp / "user")
    (runner.cwd / "data").symlink_to(small_cifar_root)  # 200 training images: 6 steps an epoch
    return runner


def all_trackers(server: MlflowServer) -> list[str]:
    return ["logger=[tensorboard,csv,mlflow,wandb]", f"logger.mlflow.tracking_uri={server.uri}",
            "logger.wandb.mode=offline"]


@pytest.fixture(scope="module")
def reference(user, mlflow_server) -> Path:
    """An uninterrupted run with every tracker (best.pt uploaded to MLflow)."""
    result = user("resnet-train", *RUN, *all_trackers(mlflow_server), "logger.mlflow.log_checkpoint=true",
                  "logger.wandb.log_checkpoint=true", "hydra.run.dir=runs/reference")
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "View run" not in output and "wandb" not in output.lower(), output  # (the libraries' own lines)
    return user.cwd / "runs" / "reference"


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = events(run_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from W&B's offline run files (every session's), W&B's own keys left out."""
    run_id = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["trackers"]["wandb"]
    held: dict[str, list[tuple[int, float]]] = {}
    for step, row in wandb_history(run_dir / "wandb", run_id):
        for key, value in row.items():
            if not key.startswith("_"):
                held.setdefault(key, []).append((step, value))
    return held


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def as_float32(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard keeps scalars as float32: the trackers' doubles, rounded the same way."""
    return {tag: [(step, float(torch.tensor(value, dtype=torch.float32))) for step, value in points]
            for tag, points in history.items()}


def assert_holds_tensorboards_scalars(tracker: dict, tensorboard: dict, timing: bool = True) -> None:
    """The same tags, each at the same steps (each once) with the same values."""
    assert set(tracker) == set(tensorboard)
    for tag, points in tensorboard.items():
        got = as_float32(tracker)[tag]
        if not timing and tag.startswith(TIMING_TAGS):
            assert [s for s, _ in got] == [s for s, _ in points], tag
        else:
            assert got == points, tag


def test_every_tracker_holds_tensorboards_metrics(reference, mlflow_server):
    tensorboard = tensorboard_scalars(reference)
    assert {"train/loss", "loss/val", "accuracy/val", "metrics/test_accuracy"} <= set(tensorboard)
    assert_holds_tensorboards_scalars(mlflow_server.history("runs/reference"), tensorboard)
    assert_holds_tensorboards_scalars(wandb_scalars(reference), tensorboard)
    rows = csv_rows(reference)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for tag, value in row.items():
            if tag != "step":
                assert (int(row["step"]), float(torch.tensor(float(value), dtype=torch.float32))) \
                    in tensorboard[tag], tag


def test_mlflow_run_has_the_hyperparameters_environment_config_and_best_checkpoint(reference, mlflow_server):
    run = mlflow_server.run_named("runs/reference")
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "resnet20" and run.data.params["optim.lr"] == "0.1"
    assert run.data.tags["env.torch"] == torch.__version__ and run.data.tags["env.hostname"] == socket.gethostname()
    artifacts = {a.path for a in mlflow_server.client().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    stored = [a.path for a in mlflow_server.client().list_artifacts(run.info.run_id, "checkpoints")]
    assert stored == ["checkpoints/best.pt"]


def test_wandb_run_has_the_name_hyperparameters_and_environment(reference):
    run_id = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["trackers"]["wandb"]
    records = list(wandb_records(reference / "wandb", run_id))
    assert {r.run.display_name for r in records if r.WhichOneof("record_type") == "run"} == {"runs/reference"}
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["model"] == "resnet20" and config["environment"]["torch"] == torch.__version__
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)  # (best.pt, log_checkpoint=true)


def test_the_environment_is_in_metrics_json_and_tensorboard(reference):
    environment = metrics_of(reference)["environment"]
    assert ENVIRONMENT_KEYS <= environment.keys()
    assert environment["torch"] == torch.__version__ and environment["command"].startswith("resnet-train ")
    assert "logger=[tensorboard,csv,mlflow,wandb]" in environment["command"]
    text = events(reference).Tensors("environment/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(f"| {key} |" in text for key in ENVIRONMENT_KEYS)


def wait_paused(proc, phase: str) -> None:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"paused at {phase}"):
            return
    raise AssertionError(f"the run ended (exit {proc.wait()}) before pausing at {phase}:\n{''.join(seen)}")


# checkpoint_write@2: epoch 2's scalars were sent, its checkpoint not written (last.pt: step 6);
# train_step@11 with a checkpoint every 4 steps: step 10's train/loss sent, last.pt at step 8.
KILLS = {"checkpoint_write@2": [], "train_step@11": ["checkpoint.every_n_steps=4"]}


@pytest.mark.parametrize("phase", list(KILLS))
def test_a_killed_and_resumed_run_holds_every_step_once(reference, user, mlflow_server, phase):
    name = f"runs/killed-{phase.replace('@', '-')}"
    proc = user.popen("resnet-train", *RUN, *KILLS[phase], *all_trackers(mlflow_server), f"hydra.run.dir={name}",
                      env={"RESNET_TRAIN_PAUSE_AT": phase})
    wait_paused(proc, phase)
    proc.kill()
    proc.wait()
    sent_before = mlflow_server.history(name)
    saved_step = torch.load(user.cwd / name / "checkpoints" / "last.pt", weights_only=True)["state"]["global_step"]
    assert max(s for s, _ in sent_before["train/loss"]) > saved_step  # (sent steps the checkpoint does not hold)
    assert mlflow_server.run_named(name).info.status == "RUNNING"  # (killed: nobody said otherwise)

    assert_ok(user("resnet-train", f"resume={name}"))
    run_dir = user.cwd / name
    tensorboard = tensorboard_scalars(reference)
    assert_holds_tensorboards_scalars(tensorboard_scalars(run_dir), tensorboard, timing=False)
    assert_holds_tensorboards_scalars(mlflow_server.history(name), tensorboard, timing=False)
    assert_holds_tensorboards_scalars(wandb_scalars(run_dir), tensorboard, timing=False)
    assert [{k: v for k, v in r.items() if not k.startswith(TIMING_TAGS)} for r in csv_rows(run_dir)] == \
        [{k: v for k, v in r.items() if not k.startswith(TIMING_TAGS)} for r in csv_rows(reference)]
    assert mlflow_server.run_named(name).info.status == "FINISHED"
    sessions = {p.parent.name for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(sessions) == 2  # (one W&B run, a file per session)
    assert len(set(mlflow_server.client().search_runs(
        [mlflow_server.client().get_experiment_by_name("resnet-train").experiment_id],
        filter_string=f"attributes.run_name = '{name}'"))) == 1


def test_logger_given_with_resume_replaces_the_runs_trackers(reference, user, mlflow_server):
    """A run whose server is gone continues without it: `logger=` with `resume=` chooses anew."""
    shutil.copytree(reference, user.cwd / "runs" / "no-server")
    assert_ok(user("resnet-train", "resume=runs/no-server", "epochs=3", "logger=[tensorboard,csv]"))
    ckpt = torch.load(user.cwd / "runs" / "no-server" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["trackers"] == {} and set(ckpt["config"]["logger"]) == {"tensorboard", "csv"}
    assert [int(r["epoch"]) for r in csv_rows(user.cwd / "runs" / "no-server")] == [1, 2, 3]
    assert max(s for s, _ in mlflow_server.history("runs/reference")["train/loss"]) == 12  # (not continued)


def test_an_unreachable_tracker_is_one_line_before_any_data_is_read(user):
    result = user("resnet-train", *RUN, "logger=[tensorboard,mlflow]",
                  "logger.mlflow.tracking_uri=http://127.0.0.1:9", "dataset.root=no-such-data",
                  "hydra.run.dir=runs/unreachable")
    assert_one_error(result, "logger=mlflow", "http://127.0.0.1:9")
    assert not (user.cwd / "runs" / "unreachable").exists()  # (no run dir left behind, as for bad data)


def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_finishes(user, tmp_path):
    server = MlflowServer(tmp_path / "doomed")
    try:
        proc = user.popen("resnet-train", *RUN, "logger=[tensorboard,mlflow]",
                          f"logger.mlflow.tracking_uri={server.uri}", "hydra.run.dir=runs/server-gone",
                          env={"RESNET_TRAIN_PAUSE_AT": "validation@1", "RESNET_TRAIN_PAUSE_SECONDS": "3"})
        wait_paused(proc, "validation@1")
        server.stop()  # (while the run waits after its first validation)
        output, _ = proc.communicate(timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 0, output
    warnings = [line for line in output.splitlines() if "logger.mlflow" in line]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0], output
    assert f"the tracking server {server.uri} does not answer" in warnings[0]
    assert "Traceback" not in output and "Retrying" not in output  # (nor urllib3's retries)
    metrics = metrics_of(user.cwd / "runs" / "server-gone")
    assert metrics["epochs"] == 2 and metrics["test_accuracy"] is not None


def test_a_missing_library_names_its_extra(user, tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "mlflow.py").write_text("raise ImportError('mlflow is hidden for this test')\n")
    no_mlflow = Runner(user.cwd, PYTHONPATH=f"{hidden}{os.pathsep}{os.environ['RESNET_TRAIN_TEST_SITE']}")
    result = no_mlflow("resnet-train", *RUN, "logger=[tensorboard,mlflow]", "hydra.run.dir=runs/no-mlflow")
    assert_one_error(result, 'logger=mlflow needs MLflow: pip install "resnet-train[mlflow]"')


def test_a_csv_write_that_fails_is_one_line_naming_the_file(user, tmp_path):
    hook = tmp_path / "full_disk.py"
    hook.write_text(
        "import errno\n"
        "from resnet_train import trackers\n"
        "real = trackers.atomic_write\n"
        "def full(f):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "trackers.atomic_write = lambda path, write: real(path, full if path.name == 'metrics.csv' else write)\n")
    full = Runner(user.cwd, RESNET_TRAIN_TEST_HOOK=str(hook))
    result = full("resnet-train", *RUN, "logger=[tensorboard,csv]", "hydra.run.dir=runs/csv-full")
    assert_one_error(result, "could not write", "runs/csv-full/metrics.csv", "the disk is full")


def test_a_sweep_gives_each_job_its_own_tracker_run(user, mlflow_server):
    result = user("resnet-train", "-m", *RUN, "epochs=1", "optim.lr=0.1,0.05", "logger=[csv,mlflow]",
                  f"logger.mlflow.tracking_uri={mlflow_server.uri}", "hydra.sweep.dir=sweeps/lr")
    assert_ok(result)
    for job in ("optim.lr=0.1", "optim.lr=0.05"):
        run = mlflow_server.run_named(job)
        assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == job.split("=")[1]
        job_dir = user.cwd / "sweeps" / "lr" / job
        assert not list(job_dir.glob("events.out.tfevents.*"))  # (TensorBoard not chosen)
        assert len(csv_rows(job_dir)) == 1


def test_logger_is_a_group_of_several(compose_cfg, run_cli):
    validate(compose_cfg("logger=[tensorboard,csv,mlflow,wandb]"))
    assert set(compose_cfg().logger) == {"tensorboard"}
    for override, key in [("logger.wandb.mode=off", "logger.wandb.mode"),
                          ("logger.mlflow.experiment=", "logger.mlflow.experiment")]:
        with pytest.raises(ConfigError, match=rf"^{key}="):
            validate(compose_cfg(f"logger=[{key.split('.')[1]}]", override))
    result = run_cli("resnet-train", "logger=[tensorboard,csv]", "--cfg", "job")  # (a list without -m: allowed)
    assert_ok(result)
    assert "csv: {}" in result.stdout
    assert_one_error(run_cli("resnet-train", "logger=[tensorboard,neptune]"), "logger=neptune: no such option")


def test_mlflow_metric_names_take_any_class_name():
    """MLflow refuses metric names with characters like ( + , &: a class's tag keeps its other letters."""
    from resnet_train.trackers import _mlflow_name

    assert _mlflow_name("test_class_f1/cat (tabby)") == "test_class_f1/cat _tabby_"
    assert _mlflow_name("val_class_accuracy/crème brûlée") == "val_class_accuracy/crème brûlée"
    assert _mlflow_name("loss/train") == "loss/train"
