"""Whether a process still runs, for the two places that outlive or wait on another process: a
run-dir lock naming its holder, and a DataLoader worker watching its run."""

from __future__ import annotations

import os


def is_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine. Another user's process counts (EPERM); a killed
    process its parent has not reaped yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # (no /proc: macOS)
        return True
