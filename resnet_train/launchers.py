"""Hydra's submitit launchers (pip install ".[slurm]"): a job of several tasks reported by its first.

The plugin collects every task's result of a job (submitit's `Job.results`) and re-raises the
first failure; a task that died without a result (killed, out of memory) becomes a traceback that
ends the whole sweep. A job's tasks train one model, and its first task fails too when another dies
(its collectives say so: PeerLost), so the first task's result -- the one the plugin reports anyway
-- tells the job's outcome. `SweepSummary` (sweep.py) switches this on for the length of a sweep.
"""

from __future__ import annotations

from typing import Any, Callable

_every_task: Callable | None = None


def report_jobs_by_their_first_task() -> None:
    global _every_task
    try:
        from submitit.core.core import Job
    except ImportError:  # (no submitit: no launcher of it to adjust)
        return
    if _every_task is None:
        _every_task = Job.results

        def first_task(job: Any) -> list:
            return [job.task(0).result()] if job.num_tasks > 1 else _every_task(job)
        Job.results = first_task


def report_jobs_by_every_task() -> None:
    """Undo `report_jobs_by_their_first_task` (a sweep has ended)."""
    global _every_task
    if _every_task is not None:
        from submitit.core.core import Job

        Job.results, _every_task = _every_task, None
