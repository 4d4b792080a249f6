"""What a result was computed with: library versions, the device, the CPU, the code's version, the
machine and the command line -- written with every result (metrics.json, TensorBoard's TEXT tab,
each tracker).

Collected once per session by the first process, from what is already known: the run's device is
asked for its name only when it is a GPU the run uses (no other GPU is initialized), nothing syncs
a device, and the git commit is read with a bounded `git` call (none where there is no repository
or no git).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

GIT_TIMEOUT_S = 5


def collect(device: torch.device, argv: list[str] | None = None) -> dict[str, str | int | bool | None]:
    """The environment of this process running on `device`, as a flat {name: value} (JSON-ready)."""
    import torchvision

    argv = sys.argv if argv is None else argv
    commit, dirty = _git_state(Path.cwd())
    return {
        "resnet_train": _version("resnet-train"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": _device_name(device),
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": _cpu_count(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "command": shlex.join([Path(argv[0]).name, *map(_without_secrets, argv[1:])]) if argv else "",
    }


def _without_secrets(arg: str) -> str:
    """A command-line argument as it may be shown with the results: a URL's password (and a token
    in its query) replaced by ***, as tracking URIs can carry them."""
    arg = re.sub(r"(://[^/:@\s]+:)[^@/\s]+@", r"\1***@", arg)
    return re.sub(r"((?:token|password|secret|api_key|apikey)=)[^&\s]+", r"\1***", arg, flags=re.I)


def as_markdown(environment: dict) -> str:
    """A two-column table for TensorBoard's TEXT tab."""
    rows = [f"| {name} | {'' if value is None else str(value).replace('|', '/')} |"
            for name, value in environment.items()]
    return "\n".join(["| | |", "|---|---|", *rows])


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _git_state(folder: Path) -> tuple[str | None, bool | None]:
    """The commit checked out in `folder`'s repository and whether tracked files differ from it."""
    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head.stdout.strip(), (bool(status.stdout.strip()) if status and status.returncode == 0 else None)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)  # (the run's own GPU: already initialized for training)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_model() or platform.machine()


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux; {} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def _cpu_model() -> str | None:
    info = _cpuinfo()
    return info.get("model name") or info.get("Hardware") or platform.processor() or None


def _cpu_flags() -> str | None:
    info = _cpuinfo()
    return info.get("flags") or info.get("Features")


def _cpu_count() -> int | None:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (macOS has no affinity)
        return os.cpu_count()
