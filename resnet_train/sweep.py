"""Sweeps (`resnet-train -m ...`): job directories named by the swept keys, and a summary of every
job's results in <sweep dir>/summary.csv plus a printed table.

Built from files (each job writes <job dir>/job_status.json), so it also works when the jobs run
elsewhere (the SLURM launcher). Which keys a sweep varies is decided once, when it starts, and
passed to its jobs in RESNET_TRAIN_SWEPT_KEYS (inherited by local jobs and by SLURM jobs alike).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import launchers, world
from .config import override_key
from .errors import Refused, RunDirError, UserError
from .files import atomic_write, write_json
from .runs import has_checkpoint

SWEPT_KEYS_ENV = "RESNET_TRAIN_SWEPT_KEYS"


def swept_keys() -> list[str]:
    """The keys the current sweep varies, in command-line order ([] outside a sweep)."""
    return [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]


def in_sweep() -> bool:
    """Whether this process runs a job of a sweep (`-m`), even one of a single job."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def job_name(task_overrides: list[str]) -> str:
    """A job's directory and TensorBoard run name: its values of the swept keys, in command-line
    order (`optim=adam,optim.lr=0.01`); the overrides every job shares are left out."""
    swept = swept_keys()
    chosen = [o for o in task_overrides if override_key(o) in swept] if swept else list(task_overrides)
    chosen.sort(key=lambda o: swept.index(override_key(o)) if swept else 0)
    return ",".join(chosen).replace("/", "_") or "job"


# `hydra.sweep.subdir: ${swept_job_name:${hydra.overrides.task}}` in train.yaml
OmegaConf.register_new_resolver("swept_job_name", lambda overrides: job_name(list(overrides)), replace=True)


def sweep_plan(config: DictConfig) -> tuple[list[str], int | None]:
    """The keys a sweep varies (command-line order), and how many jobs the basic sweeper will run
    (None for sweepers such as Optuna, whose n_trials decides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [o.get_key_element().lstrip("+~")
            for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
            if o.is_sweep_override()]
    keys += [k for k in config.hydra.sweeper.get("params") or {} if k not in keys]  # e.g. Optuna's search space
    jobs = _basic_sweep_jobs(config)
    return keys, None if jobs is None else len(jobs)


def _basic_sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, from the same expansion of hydra.sweeper.params and the command line
    that the basic sweeper makes (None for other sweepers, whose jobs are not known up front)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def planned_job_dirs(config: DictConfig) -> list[Path]:
    """The job dirs the basic sweeper will use ([] for other sweepers, or a hydra.sweep.subdir of
    the user's)."""
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", "")
    jobs = _basic_sweep_jobs(config) if "swept_job_name" in str(subdir) else None
    return [_sweep_dir(config) / job_name(job) for job in jobs or []]


def refuse_taken_job_dirs(config: DictConfig) -> None:
    """A sweep whose job dir already holds a run (the same sweep into the same hydra.sweep.dir) is
    refused before any job starts: Hydra would write the new job's config over the old run's, and
    the job would log beside it. (A single run is refused the same way, by runs.claim_new_run_dir.)"""

    if config.get("resume") == "auto":  # (the same sweep continued: its jobs' runs are kept or resumed)
        return
    taken = [d for d in planned_job_dirs(config) if has_checkpoint(d)]
    if taken:
        more = f" (and {len(taken) - 1} more job dir(s))" if len(taken) > 1 else ""
        raise Refused(RunDirError(f"{os.path.relpath(taken[0])} already holds a run{more}; choose a new "
                                  "hydra.sweep.dir so nothing there is overwritten, or continue the sweep "
                                  "with resume=auto"))


class SweepSummary(Callback):
    """After each job of a sweep: the job's status goes to <job dir>/job_status.json and
    <sweep dir>/summary.csv is rebuilt from all of them (best validation accuracy first, failed
    jobs last with their error); after the last job the table is printed as markdown."""

    COLUMNS = ("job", "overrides", "status", "best_val_accuracy", "test_accuracy", "best_epoch", "epochs",
               "wall_seconds", "error", "job_dir")  # (job_status.json also names its sweep: "sweep", the id)

    def __init__(self) -> None:
        self.printed = False
        self.failed_here = 0  # this process's jobs that failed with a user error

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept, jobs = sweep_plan(config)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
        launchers.report_jobs_by_their_first_task()
        refuse_taken_job_dirs(config)
        if world.from_environment().is_main:  # the id tells this sweep's jobs from a reused dir's older ones
            try:
                write_json(_sweep_dir(config) / "sweep.json", {"swept": swept, "jobs": jobs, "id": uuid.uuid4().hex})
            except UserError as e:  # (a sweep dir that cannot be written: Hydra would only warn, then crash)
                raise Refused(e) from None

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        info = _read_json(_sweep_dir(config) / "sweep.json")
        failed = job_return.status != JobStatus.COMPLETED
        error = getattr(job_return, "_return_value", None) if failed else None
        if world.from_environment().is_main:
            self._record(config, info, error, failed)
        if failed and info.get("jobs") and isinstance(error, UserError):
            # The basic sweeper re-raises the first failed job's error after its batch of jobs, with a
            # line of its own ("Error executing job with overrides: [...]") and naming that job only.
            # A user error is recorded in the job's status, and the sweep reports every failed job in
            # one line in on_multirun_end. (A bug keeps Hydra's path and its traceback; Optuna's
            # sweeper counts failed trials against its max_failure_rate.)
            self.failed_here += 1
            job_return.status, job_return.return_value = JobStatus.COMPLETED, None

    def _record(self, config: DictConfig, info: dict, error: BaseException | None, failed: bool) -> None:
        """The job's job_status.json, the rebuilt summary, and the table after the last job."""
        sweep_dir, job_dir = _sweep_dir(config), Path(config.hydra.runtime.output_dir).resolve()
        metrics = _read_json(job_dir / "metrics.json")
        if not failed and metrics.get("best_val_accuracy") is None:  # (a search cannot rank it either)
            failed, error = True, UserError("no epoch had a finite validation loss (the run diverged)")
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300] if failed else ""
        _write_job_status(config.hydra, info, "failed" if failed else "ok", reason, metrics)
        rows = self._write_summary(sweep_dir, info.get("id"))
        if info.get("jobs") and len(rows) >= info["jobs"]:
            self._print(sweep_dir, rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        launchers.report_jobs_by_every_task()
        if not world.from_environment().is_main:
            if self.failed_here:
                raise SystemExit(2)  # the first process reports the sweep's failures
            return
        sweep_dir = _sweep_dir(config)
        info = _read_json(sweep_dir / "sweep.json")
        rows = self._write_summary(sweep_dir, info.get("id"))
        if rows and not self.printed:
            self._print(sweep_dir, rows)
        failure = failures_line(rows, search=not info.get("jobs"))
        if failure:
            raise Refused(UserError(failure))

    def _write_summary(self, sweep_dir: Path, sweep_id: str | None) -> list[dict]:
        global _last_summary
        _last_summary = (sweep_dir, sweep_id)
        rows = _job_statuses(sweep_dir, sweep_id)
        rows.sort(key=lambda r: (r["status"] != "ok", -(r["best_val_accuracy"] or -1), r["job"]))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        if rows:
            atomic_write(sweep_dir / "summary.csv", lambda f: f.write(text.getvalue().encode()))
        return rows

    def _print(self, sweep_dir: Path, rows: list[dict]) -> None:
        self.printed = True
        pct = lambda v: "" if v is None else f"{v:.2%}"  # noqa: E731
        lines = ["| overrides | best val acc | test acc | best epoch | wall time | status |",
                 "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}s"
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
            lines.append(f"| {r['overrides']} | {pct(r['best_val_accuracy'])} | {pct(r['test_accuracy'])} | "
                         f"{r['best_epoch'] or ''} | {wall} | {status} |")
        shown = os.path.relpath(sweep_dir / "summary.csv")
        print(f"\nSweep summary ({shown}):\n" + "\n".join(lines), flush=True)


_last_summary: tuple[Path, str | None] | None = None  # (sweep dir, sweep id) of the summary written last


def record_stopped_job(signum: int) -> None:
    """A sweep job stopped by a signal (saved at a step boundary): its status says so and the summary
    lists what ran, before the signal ends the sweep; `resume=auto` continues it."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    info = _read_json(Path(hydra_cfg.sweep.dir) / "sweep.json")
    _write_job_status(hydra_cfg, info, "stopped",
                      f"by {signal.Signals(signum).name}, saved; continue the sweep with resume=auto", {})
    summary, sweep_dir = SweepSummary(), Path(hydra_cfg.sweep.dir).resolve()
    summary._print(sweep_dir, summary._write_summary(sweep_dir, info.get("id")))


def _write_job_status(hydra_cfg: DictConfig, info: dict, status: str, error: str, metrics: dict) -> None:
    """<job dir>/job_status.json: the job's swept values, status (ok, failed, stopped), final metrics
    and error, and the id of the sweep it belongs to (`hydra_cfg`: Hydra's own config of the job)."""
    sweep_dir, job_dir = Path(hydra_cfg.sweep.dir).resolve(), Path(hydra_cfg.runtime.output_dir).resolve()
    swept = [o for o in hydra_cfg.overrides.task if override_key(o) in info.get("swept", [])]
    write_json(job_dir / "job_status.json", {
        "job": hydra_cfg.job.num, "overrides": ",".join(swept) or job_dir.name, "status": status,
        **{k: metrics.get(k) for k in ("best_val_accuracy", "test_accuracy", "best_epoch", "epochs", "wall_seconds")},
        "error": error, "job_dir": os.path.relpath(job_dir, sweep_dir), "sweep": info.get("id"),
    })


def _job_statuses(sweep_dir: Path, sweep_id: str | None) -> list[dict]:
    """The job_status.json of every job of the sweep `sweep_id` (any sweep: None) under `sweep_dir`."""
    rows = [_read_json(p) for p in sweep_dir.glob("**/job_status.json")]
    return [r for r in rows if sweep_id is None or r.get("sweep") == sweep_id]


def failures_line(rows: list[dict], search: bool) -> str | None:
    """The sweep's one line about its failed jobs (None: none failed). A search (Optuna) went on past
    them -- they are failed trials in its study -- and its results come from the trials that finished."""
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return None
    first = f"{'the first, ' if len(failed) > 1 else ''}{failed[0]['overrides']}: {failed[0]['error']}"
    if not search:
        return f"{len(failed)} of {len(rows)} sweep jobs failed (every job ran; see the summary above); {first}"
    if len(failed) == len(rows):
        return f"all {len(rows)} trials of the search failed (see the summary above); {first}"
    return (f"{len(failed)} of {len(rows)} trials failed (the search ran them all; optimization_results.yaml "
            f"holds the best of the {len(rows) - len(failed)} that finished); {first}")


def all_trials_failed(error: Exception) -> str | None:
    """Optuna's sweeper, asked for its best trial when none finished, raises ValueError: the line for it."""
    if "No trials are completed yet" not in str(error) or _last_summary is None:
        return None
    rows = _job_statuses(*_last_summary)
    return failures_line(rows, search=True) if rows else None


def _sweep_dir(config: DictConfig) -> Path:
    """Absolute: the default sweep dir is relative (multirun/<date>/<time>), job dirs are absolute."""
    return Path(str(config.hydra.sweep.dir)).resolve()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
