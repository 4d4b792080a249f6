"""DataLoader workers as a run needs them: they leave Ctrl-C to the run, end with it however it
ends, and their errors arrive as one line."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any, Iterator

import torch

from ..errors import DataError
from ..processes import is_running


def worker_init() -> functools.partial:
    """The `worker_init_fn` of every DataLoader of ours."""
    return functools.partial(_start_worker, os.getpid())


def _start_worker(run_pid: int, worker_id: int) -> None:
    """The run stops at a step boundary on Ctrl-C, so its workers ignore it. torch's own watchdog
    ends a worker whose parent died; under the forkserver start method (Python 3.14's default) that
    parent is the server, not the run, so a SIGKILLed run's workers would live on: this thread ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_gone, args=(run_pid,), daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    while is_running(pid):
        time.sleep(1.0)
    os._exit(0)


def from_workers(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Iterate `loader`; a DataError raised in a worker process arrives as one line again (PyTorch
    re-raises it with the worker's whole traceback as its message)."""
    try:
        yield from loader
    except DataError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise DataError(lines[-1].split("DataError: ", 1)[-1] if lines else str(e)) from None
