"""Trackers beside TensorBoard (the `logger` group): a CSV file in the run dir, MLflow, Weights & Biases.

`reporting.RunReporter` forwards to them what it writes to TensorBoard: the hyperparameters, the
environment and the config at the start, every scalar under TensorBoard's tag at TensorBoard's
step (the per-step, per-epoch and final metrics), and at the end, optionally, best.pt as an
artifact. A tracker's run is named after the run (a sweep's job: its swept values), and its id is
kept in the run's checkpoints, so a resumed run continues the same tracker run.

No step twice. A run killed after it sent steps its last checkpoint does not hold is resumed from
that checkpoint and computes them again (bitwise the same on the CPU). TensorBoard hides the killed
run's later events (purge_step); the CSV file is rewritten without its rows after the checkpoint;
MLflow and W&B keep what they hold, and the resumed run skips the steps they already have: each
metric's last step in MLflow (asked once, at the resume); W&B's last step, read from the run's own
files in offline mode (<run dir>/wandb), from the server's resumed run online.

Failures. A tracker that cannot be used at the start -- its library missing, its server not
answering, no W&B login -- is one `error:` line before any data is read (TrackerError). A remote
tracker that fails later is one warning, and the run goes on without it. The CSV file is in the run
dir: a write that fails is one line naming it, like a checkpoint's (files.atomic_write).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, TrackerError, first_line
from .files import atomic_write

log = logging.getLogger("resnet_train")

CSV_NAME = "metrics.csv"
WANDB_FOLDER = "wandb"  # under the run dir: W&B's own files (offline runs, logs)
# (library, what it is called, its extra) of each remote tracker
LIBRARIES = {"mlflow": ("mlflow", "MLflow"), "wandb": ("wandb", "W&B")}
# MLflow retries an unanswered request for minutes by default: a few seconds here, then the
# tracker is reported (users may set these themselves)
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
LONGEST_TAG = 5000  # characters of an MLflow tag value (the CPU's flags are long)


@dataclass
class TrackedRun:
    """What every tracker is told about the run it records."""

    run_dir: Path
    name: str  # the run dir as shown, or a sweep job's name
    resume_step: int | None = None  # a resumed run: its checkpoint's global step
    ids: dict[str, str] = field(default_factory=dict)  # tracker -> its run id, from the checkpoint


class Tracker:
    """One destination of a run's results (the defaults do nothing)."""

    name = ""
    remote = False  # a service that may fail mid-run without failing the run
    run_id: str | None = None

    def start(self, params: dict[str, Any], environment: dict[str, Any], config_yaml: str) -> None: ...
    def metrics(self, values: dict[str, float], step: int) -> None: ...
    def epoch(self, values: dict[str, float], step: int) -> None:
        self.metrics(values, step)
    def finish(self, best_checkpoint: Path | None) -> None: ...
    def close(self) -> None: ...
    def failure(self, error: Exception) -> str:
        """What went wrong, in a few words (the warning when it fails mid-run)."""
        return first_line(error)


class Trackers:
    """The chosen trackers, called together; a remote one that fails is reported once and dropped."""

    def __init__(self, trackers: list[Tracker]):
        self.active = list(trackers)
        self._closed = False

    def ids(self) -> dict[str, str]:
        """tracker -> its run id: kept in the checkpoints, so a resume continues the same runs."""
        return {t.name: t.run_id for t in self.active if t.run_id is not None}

    def start(self, params: dict[str, Any], environment: dict[str, Any], config_yaml: str) -> None:
        self._each("start", params, environment, config_yaml)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._each("metrics", values, step)

    def epoch(self, values: dict[str, float], step: int) -> None:
        self._each("epoch", values, step)

    def finish(self, best_checkpoint: Path | None) -> None:
        self._each("finish", best_checkpoint)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._each("close")

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            if not tracker.remote:
                getattr(tracker, method)(*args)
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 (a service's failure of any kind must not end the training)
                self.active.remove(tracker)
                with contextlib.suppress(Exception):  # (end its run if the service still answers)
                    tracker.close()
                log.warning(f"logger.{tracker.name} failed ({tracker.failure(e)}); the run goes on without it (its "
                            "results are still in metrics.json)")


def open_trackers(chosen: dict[str, Any], run: TrackedRun) -> Trackers:
    """Start (or, resumed, reopen) the trackers `chosen` in the config's `logger` node (TensorBoard
    is RunReporter's own); TrackerError or ConfigError in one line if one cannot be used."""
    makers = {"csv": CsvTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
    opened: list[Tracker] = []
    try:
        for name, settings in chosen.items():
            if name in makers:
                opened.append(makers[name](dict(settings or {}), run))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


def _library(tracker: str) -> Any:
    """The tracker's library, or ConfigError naming the extra that installs it."""
    import importlib

    module, called = LIBRARIES[tracker]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f'logger={tracker} needs {called}: pip install "resnet-train[{tracker}]"') from None


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


class CsvTracker(Tracker):
    """<run dir>/metrics.csv: one row per epoch, `step` and TensorBoard's epoch scalars as columns,
    rewritten whole (atomically) after each epoch."""

    name = "csv"

    def __init__(self, settings: dict, run: TrackedRun):
        self.path = run.run_dir / CSV_NAME
        self.rows = read_csv_rows(self.path) if run.resume_step is not None else []
        kept = [r for r in self.rows if int(r["step"]) <= run.resume_step] if run.resume_step is not None else []
        if len(kept) < len(self.rows):  # (a killed run's rows after its checkpoint, as TensorBoard purges them)
            self.rows = kept
            self._write()

    def epoch(self, values: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **values})
        self._write()

    def _write(self) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


class MlflowTracker(Tracker):
    """A run in an MLflow experiment: hyperparameters as params, the environment as `env.*` tags,
    the config as the artifact config.yaml, the scalars as metrics (MLflow's client, no global run)."""

    name, remote = "mlflow", True

    def __init__(self, settings: dict, run: TrackedRun):
        mlflow = _library("mlflow")
        from mlflow.tracking import MlflowClient

        _quiet("mlflow", "alembic")
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # (its retries, a line each)
        for var, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(var, value)
        self.uri = settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self.settings, self.finished, self.held = settings, False, {}
        self.new = "mlflow" not in run.ids
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            if self.new:
                experiment = self.client.get_experiment_by_name(settings["experiment"])
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(settings["experiment"]))
                self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
            else:
                self.run_id = run.ids["mlflow"]
                self.client.update_run(self.run_id, status="RUNNING")
                self.held = self._held_steps()
        except Exception as e:  # noqa: BLE001 (the library's errors have no common class)
            raise TrackerError(f"logger=mlflow: {self.failure(e)}; start it or set logger.mlflow.tracking_uri (or "
                               "MLFLOW_TRACKING_URI)") from None

    def failure(self, error: Exception) -> str:
        text = str(error)
        if any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "Failed to resolve")):
            return f"the tracking server {self.uri} does not answer"
        return f"the tracking server {self.uri}: {first_line(error)}"

    def _held_steps(self) -> dict[str, int]:
        """Each metric's last step in the run (a killed session may have sent steps after its checkpoint)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in keys}

    def start(self, params: dict[str, Any], environment: dict[str, Any], config_yaml: str) -> None:
        from mlflow.entities import Param, RunTag

        held = self.client.get_run(self.run_id).data.params if not self.new else {}
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items() if k not in held],
                              tags=[RunTag(f"env.{k}", str(v)[:LONGEST_TAG]) for k, v in environment.items()])
        if self.new:
            self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(_mlflow_name(k), float(v), now, step) for k, v in values.items()
                 if step > self.held.get(_mlflow_name(k), -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def finish(self, best_checkpoint: Path | None) -> None:
        if self.settings.get("log_checkpoint") and best_checkpoint is not None and best_checkpoint.is_file():
            self.client.log_artifact(self.run_id, str(best_checkpoint), "checkpoints")
        self._set_terminated("FINISHED")
        self.finished = True

    def close(self) -> None:
        if not self.finished:  # stopped, failed or killed: a resume sets it RUNNING again
            self._set_terminated("KILLED")

    def _set_terminated(self, status: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # (MLflow prints two lines of links to the run)
            self.client.set_terminated(self.run_id, status)


def _mlflow_name(tag: str) -> str:
    """A TensorBoard tag as MLflow takes a metric's name: letters, digits and `_ - . / space :` only (a
    class named `cat (tabby)` gives `test_class_f1/cat _tabby_`)."""
    return re.sub(r"[^\w\-./ :]", "_", tag)


# --------------------------------------------------------------------------------------------
# Weights & Biases
# --------------------------------------------------------------------------------------------


class WandbTracker(Tracker):
    """A W&B run (files in <run dir>/wandb): hyperparameters and the environment in its config, the
    scalars as its history at TensorBoard's steps. Console capture and system metrics are off.

    wandb-core writes a run's file in 32 KiB blocks (and every 15 s): a killed process loses what
    it had not written yet, steps its checkpoint may hold. So each row is also appended to a journal
    (`sent-<id>.jsonl`, beside W&B's files) before W&B gets it, and a resume sends again, from the
    journal, the rows up to its checkpoint that W&B does not hold."""

    name, remote = "wandb", True

    def __init__(self, settings: dict, run: TrackedRun):
        wandb = _library("wandb")
        self.settings, self.finished, self.held_step, self.backlog = settings, False, -1, []
        self.run_id = run.ids.get("wandb") or uuid.uuid4().hex[:12]
        folder = run.run_dir / WANDB_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        _quiet("wandb")
        try:
            self.run = wandb.init(project=settings["project"], entity=settings.get("entity"), name=run.name,
                                  id=self.run_id, resume="allow", mode=settings["mode"], dir=str(run.run_dir),
                                  settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        except Exception as e:  # noqa: BLE001 (wandb's errors have no common class)
            raise TrackerError(f"logger=wandb: cannot start the W&B run ({first_line(e)}); log in with `wandb login`, "
                               "or use logger.wandb.mode=offline (and `wandb sync` later)") from None
        self.journal_path = folder / f"sent-{self.run_id}.jsonl"
        journal = _read_journal(self.journal_path) if run.resume_step is not None else []
        if run.resume_step is not None and "wandb" in run.ids:
            self.held_step = self._held_step(folder)
            self.backlog = [(step, values) for step, values in journal if self.held_step < step <= run.resume_step]
        kept = "".join(json.dumps([step, values]) + "\n" for step, values in journal
                       if run.resume_step is not None and step <= run.resume_step)
        atomic_write(self.journal_path, lambda f: f.write(kept.encode()))
        self.journal = open(self.journal_path, "a")

    def _held_step(self, folder: Path) -> int:
        """The last step the resumed W&B run holds: in its files (offline) or on the server."""
        if self.settings["mode"] == "offline":
            return max((step for step, _ in wandb_history(folder, self.run_id)), default=-1)
        return int(getattr(self.run, "starting_step", 0) or 0) - 1

    def start(self, params: dict[str, Any], environment: dict[str, Any], config_yaml: str) -> None:
        self.run.config.update({**params, "environment": environment}, allow_val_change=True)
        for step, values in self.backlog:  # (what a killed session sent and W&B lost)
            self.run.log(values, step=step)
        self.held_step = max([self.held_step, *(step for step, _ in self.backlog)])

    def metrics(self, values: dict[str, float], step: int) -> None:
        if step > self.held_step:
            self.journal.write(json.dumps([step, values]) + "\n")
            self.journal.flush()  # (a killed process's written lines are kept by the OS)
            self.run.log(dict(values), step=step)

    def finish(self, best_checkpoint: Path | None) -> None:
        import wandb

        if self.settings.get("log_checkpoint") and best_checkpoint is not None and best_checkpoint.is_file():
            artifact = wandb.Artifact(f"{self.run_id}-best", type="model")
            artifact.add_file(str(best_checkpoint))
            self.run.log_artifact(artifact)
        self.run.finish()
        self.finished = True

    def close(self) -> None:
        self.journal.close()
        if not self.finished:
            self.run.finish(exit_code=1)


def _read_journal(path: Path) -> list[tuple[int, dict[str, float]]]:
    """The rows a W&B tracker sent, in order (a line torn by a kill ends it)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            step, values = json.loads(line)
        except ValueError:
            break
        rows.append((int(step), values))
    return rows


# W&B's run files (`run-<id>.wandb`): a LevelDB-style log of protobuf records in 32 KiB blocks
_WANDB_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic, version
_WANDB_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)
_WANDB_BLOCK = 32768


def wandb_history(folder: Path, run_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, {key: value}) of every history row in the run's files under `folder` (W&B's `dir`),
    oldest file first."""
    for record in wandb_records(folder, run_id):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = record.history.step.num if record.history.HasField("step") else row.get("_step")
            yield int(step if step is not None else row["_step"]), row


def wandb_records(folder: Path, run_id: str) -> Iterator[Any]:
    """The protobuf records (run, config, history, ...) of the run's files under `folder`, oldest first."""
    from wandb.proto import wandb_internal_pb2

    for path in sorted(Path(folder).glob(f"*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.parent.name):
        for data in _wandb_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(data)
            except Exception:  # noqa: BLE001 (a torn last record of a killed run)
                break
            yield record


def _wandb_records(data: bytes) -> Iterator[bytes]:
    index, pending = _WANDB_FILE_HEADER.size, b""
    while index + _WANDB_RECORD_HEADER.size <= len(data):
        left = _WANDB_BLOCK - index % _WANDB_BLOCK
        if left < _WANDB_RECORD_HEADER.size:  # (a block's tail too short for a header is padding)
            index += left
            continue
        _, length, kind = _WANDB_RECORD_HEADER.unpack_from(data, index)
        index += _WANDB_RECORD_HEADER.size
        if kind == 0 or index + length > len(data):  # (zeros, or a record torn by a kill)
            return
        chunk, index = data[index:index + length], index + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _quiet(*loggers: str) -> None:
    """Libraries' own INFO lines (MLflow's, alembic's database set-up, W&B's) stay out of the run's output."""
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
