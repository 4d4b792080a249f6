"""The run lock (runs.lock) belongs to the process that took it: a run killed with SIGKILL can be
resumed at once although the DataLoader workers it forked live on, a live holder keeps it and is
named, a second claim in the holding process changes nothing, and a lock that outlived its taker
(an flock, as resnet-train took before) is refused saying so. Small helper processes that import
resnet_train.runs alone hold the locks (/proc tells which files a process has open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resnet_train import runs
from resnet_train.errors import RunDirTaken

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc (Linux)")

# A process that locks a run dir -- with runs.lock, or "flock" as resnet-train did before record
# locks -- then answers one line per command read from stdin.
HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    from pathlib import Path
    from resnet_train import runs

    run_dir, how = Path(sys.argv[1]), sys.argv[2]
    if how == "flock":
        fd = os.open(run_dir / runs.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    else:
        runs.lock(run_dir)
    print("ready", flush=True)
    for command in sys.stdin:
        what, _, arg = command.strip().partition(" ")
        if what == "fork":  # a DataLoader worker: a forked child that keeps the descriptors it inherited
            child = os.fork()
            if child == 0:
                time.sleep(120 if arg == "sleep" else 0)
                os._exit(0)
            if arg != "sleep":
                os.waitpid(child, 0)
            print(child, flush=True)
        elif what == "lock":
            runs.lock(arg)
            lock_file = (run_dir / runs.LOCK_NAME).resolve()
            print(sum(p.resolve() == lock_file for p in Path("/proc/self/fd").iterdir()), flush=True)
        elif what == "unlock":
            runs.unlock(run_dir)
            print("unlocked", flush=True)
""")


class Holder:
    def __init__(self, run_dir: Path, how: str = "runs.lock"):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), how], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout.readline().strip() == "ready"

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # (no handler, no cleanup: as the OOM killer or `kill -9`)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def running(pid: int) -> bool:
    """Whether process `pid` runs (a killed orphan stays a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def has_open(pid: int, path: Path) -> bool:
    return any(fd.resolve() == path.resolve() for fd in Path(f"/proc/{pid}/fd").iterdir())


def kill_worker(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:  # (its descriptors close as it dies)
        time.sleep(0.01)


def take_and_let_go(run_dir: Path) -> None:
    runs.lock(run_dir)
    runs.unlock(run_dir)


def test_a_killed_run_can_be_resumed_at_once_while_the_workers_it_forked_live_on(tmp_path):
    holder = Holder(tmp_path)
    worker = int(holder.ask("fork sleep"))
    try:
        holder.kill()
        assert running(worker) and has_open(worker, tmp_path / runs.LOCK_NAME)  # (it inherited the descriptor)
        take_and_let_go(tmp_path)  # at once, as a launcher's restart would: not refused
    finally:
        kill_worker(worker)


def test_a_live_holder_keeps_the_lock_and_is_named(tmp_path):
    holder = Holder(tmp_path)
    try:
        holder.ask("fork")  # a worker that ends (at an epoch's end) closes its copy: the holder's lock stays
        with pytest.raises(RunDirTaken) as refused:
            runs.lock(tmp_path)
        assert f"{tmp_path} is in use by another resnet-train process (pid {holder.pid})" in str(refused.value)
        assert "exited" not in str(refused.value) and not has_open(os.getpid(), tmp_path / runs.LOCK_NAME)
    finally:
        holder.kill()
    take_and_let_go(tmp_path)


def test_a_second_claim_in_the_holding_process_keeps_its_one_lock(tmp_path):
    """Record locks are per process: a second lockf there succeeds, and closing a second descriptor of
    the file would drop the process's lock. So a claim of a held dir (under any name) is no new lock."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "link").symlink_to(run_dir)
    holder = Holder(run_dir)
    try:
        assert holder.ask(f"lock {tmp_path / 'link'}") == "1"  # descriptors of .lock the holder has open
        assert holder.ask(f"lock {run_dir}") == "1"
        with pytest.raises(RunDirTaken, match=f"pid {holder.pid}"):
            runs.lock(run_dir)
        assert holder.ask("unlock") == "unlocked"  # one unlock lets go
        take_and_let_go(run_dir)
    finally:
        holder.kill()


def test_a_refusal_says_when_the_recorded_holder_has_exited(tmp_path):
    """An flock (resnet-train's lock before record locks) lives on in the processes its taker forked."""
    lock_file = tmp_path / runs.LOCK_NAME
    holder = Holder(tmp_path, how="flock")
    worker = None
    try:
        with pytest.raises(RunDirTaken, match=f"in use by another resnet-train process \\(pid {holder.pid}\\)"):
            runs.lock(tmp_path)
        worker = int(holder.ask("fork sleep"))
        holder.kill()
        with pytest.raises(RunDirTaken) as refused:
            runs.lock(tmp_path)
        assert str(refused.value) == (
            f"{tmp_path} is locked by pid {holder.pid}, which has exited; its child processes (DataLoader workers) "
            f"still hold the lock: wait for them to exit or kill them (fuser -v {lock_file} lists them)")
        assert not has_open(os.getpid(), lock_file)  # (closed: the record lock it took before refusing is gone)
    finally:
        holder.kill()
        if worker is not None:
            kill_worker(worker)
    take_and_let_go(tmp_path)
