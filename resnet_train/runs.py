"""Run directories: what lies where in one (`checkpoint_file`, `run_dir_of`), one run per directory
(claimed and locked), finding a run's checkpoint, the command line that resumes a run in place,
and torchrun's agreement on one directory.

A run directory is locked (a POSIX record lock, `lockf`, on <run dir>/.lock) for as long as a
process trains in it, by new runs and by `resume=` alike. A record lock belongs to the process
that took it -- not to the open file, as an `flock` does -- so the kernel drops it when that
process ends, however it ends, and its forked children (DataLoader workers) never hold it: a
killed run blocks neither the next one nor its own `resume=`. The checks before a run that need
more than the run directory are preflight.py's. No torch here: these checks answer at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from .config import override_key
from .errors import CheckpointError, ConfigError, RunDirError, RunDirTaken
from .files import remove_stale_temporaries
from .processes import is_running

LOCK_NAME = ".lock"
STAMP_ENV = "RESNET_TRAIN_RUN_STAMP"  # torchrun's agreed time stamp (train.yaml's hydra.run.dir reads it)
# What this command has claimed (one command per process; `forget_claims` starts over, as a new one).
_held: dict[Path, int] = {}  # run dir -> the open lock file's descriptor, while this process holds it
_restart: set[Path] = set()  # run dirs that `resume=` starts again (no checkpoint yet): may be reused
_created: set[Path] = set()  # run dirs this process made (removed again if the run fails before training)
_scratch: set[Path] = set()  # the run dir Hydra makes for a process other than the first (not the run's)


def checkpoint_file(run_dir: Path, name: str = "last") -> Path:
    """Where a run keeps checkpoint `name` (last, best)."""
    return Path(run_dir) / "checkpoints" / f"{name}.pt"


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to (<run dir>/checkpoints/<name>.pt)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run has trained far enough to be resumed (its last.pt is written)."""
    return checkpoint_file(run_dir).exists()


def forget_claims() -> None:
    """Release every run dir this process holds and forget what it made: a console script starts
    with this, so a command run again in the same process (the tests do) starts as a new process would."""
    for run_dir in list(_held):
        unlock(run_dir)
    _restart.clear()
    _created.clear()


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------


def lock(run_dir: Path) -> None:
    """Hold <run dir>/.lock until `unlock` or the end of the process; RunDirTaken naming the
    holder's pid if another process has it. Claiming a run dir this process holds already does
    nothing (one `unlock` releases it)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        # Record locks are per process: a second lockf here would succeed, and closing its descriptor
        # later would drop the lock this process holds. So the file is opened once per holder.
        return
    fd = _open_lock_file(run_dir)
    try:
        _take(fd, run_dir)
    except BaseException:
        os.close(fd)  # (lets go of a record lock `_take` got before refusing: this process held none before)
        raise
    # The pid is read by refused processes only, through their own descriptor, never by this one.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd


def unlock(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing (any of) this process's descriptors of the file drops its record lock


def _open_lock_file(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot use {run_dir}: {e.strerror.lower()}") from None


def _take(fd: int, run_dir: Path) -> None:
    """Lock the whole file for this process, or raise RunDirTaken saying who has it."""
    try:
        flock_free = _no_flock_on(fd)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (the whole file: from offset 0 to its end, however long)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise _taken(fd, run_dir, by_flock=False) from None
        raise RunDirError(f"cannot lock {run_dir / LOCK_NAME}: {e.strerror.lower()}") from None  # (e.g. ENOLCK)
    if not flock_free:  # (no live record holder, so the flock is the whole story; `lock` lets go again)
        raise _taken(fd, run_dir, by_flock=True)


def _no_flock_on(fd: int) -> bool:
    """Whether no process holds an exclusive `flock` on the file, which record locks do not see: as
    resnet-train did before it locked with lockf, and the DataLoader workers of such a run go on
    doing once it is killed. Probed with a shared flock let go at once: probes never refuse each
    other, and nothing forked later inherits one. (Before lockf: an NFS client emulates flock with
    a record lock of another owner, which would conflict with this process's own.)"""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _taken(fd: int, run_dir: Path, by_flock: bool) -> RunDirTaken:
    """The refusal, naming the pid the holder recorded. A record lock's holder is alive (the kernel
    drops the lock with its process); an flock outlives its process in the processes it forked."""
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"  # (through the refused descriptor)
    if by_flock and holder.isdigit() and not is_running(int(holder)):
        return RunDirTaken(f"{run_dir} is locked by pid {holder}, which has exited; its child processes "
                           "(DataLoader workers) still hold the lock: wait for them to exit or kill them "
                           f"(fuser -v {run_dir / LOCK_NAME} lists them)")
    return RunDirTaken(f"{run_dir} is in use by another resnet-train process (pid {holder}); wait for it "
                       "to finish or choose another hydra.run.dir")


def claim_new_run_dir(run_dir: Path, overrides: list[str]) -> None:
    """Lock `run_dir` for a new run. It must be empty -- except a run that died before its first
    checkpoint, which the same command line (or `resume=`) starts again in place."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.exists():
        _created.add(run_dir)
    lock(run_dir)
    contents = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
    if not contents:
        return
    if has_checkpoint(run_dir) or not (run_dir in _restart or stored_overrides(run_dir) == _without_hydra(overrides)):
        unlock(run_dir)
        has_run = has_checkpoint(run_dir)
        raise RunDirTaken(f"{run_dir} already holds " + ("a run" if has_run else "other files")
                          + "; choose a new hydra.run.dir so nothing there is overwritten"
                          + (f", or continue it with resume={run_dir}" if has_run else ""))
    start_again(run_dir)


def claim_default_run_dir(run_dir: Path, overrides: list[str]) -> Path:
    """Claim the run dir Hydra named by the time (outputs/<date>/<time>) for a new run -- or, when a
    run started in the same second holds it, the first free of <time>_2, <time>_3, ..."""
    for n in range(1, 1000):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}_{n}")
        try:
            claim_new_run_dir(candidate, overrides)
            return candidate
        except RunDirTaken:
            continue
    raise RunDirTaken(f"{run_dir} and 998 more run dirs named after it are taken; choose a hydra.run.dir")


def start_again(run_dir: Path) -> None:
    """Clear what a run that died before its first checkpoint left (its TensorBoard events, partial
    files); its train.log is kept and appended to."""
    for path in run_dir.iterdir():
        if path.name.startswith("events.out.tfevents") or path.name == "metrics.json" \
                or path == checkpoint_file(run_dir).parent:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    remove_stale_temporaries(run_dir)


def discard_unstarted(run_dir: Path) -> None:
    """Remove what a new run made before failing, when it failed before training (bad data, say):
    the folder if this process created it, else the files Hydra wrote into it."""
    run_dir = Path(run_dir).resolve()
    if checkpoint_file(run_dir).parent.exists():
        return
    unlock(run_dir)
    if run_dir in _created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (".hydra", "train.log", LOCK_NAME):
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def stored_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    return _without_hydra(list(OmegaConf.load(path))) if path.is_file() else None


def _without_hydra(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not override_key(o).startswith(("hydra.", "hydra/"))]


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def find_checkpoint(target: str, name: str = "last") -> Path:
    """A checkpoint file from a path to it, to its run dir (its checkpoint `name`), or `latest` (the
    newest run under outputs/)."""
    if target == "latest":
        found = sorted(Path("outputs").glob(f"**/{checkpoint_file('', name)}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"resume=latest: no run with {checkpoint_file('', name)} under "
                                  f"{Path('outputs').resolve()}")
        return found[-1].resolve()
    path = Path(target).expanduser()
    in_run_dir = checkpoint_file(path, name)
    for candidate in (path, in_run_dir, path / in_run_dir.name):
        if candidate.is_file():
            return candidate.resolve()
    raise CheckpointError(f"no checkpoint at {path} (looked for {path}, {in_run_dir})")


# --------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------


def _quote(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_arguments(args: list[str]) -> list[str]:
    """`resume=X` continues run X in its own run dir: point Hydra there without letting it rewrite
    the run's .hydra/ record (the run's config is the one in its checkpoint). A run dir without a
    checkpoint yet (its run died first) is started again from its stored command line."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not given or given[-1] in ("", "null"):
        return args
    if {"-m", "--multirun"} & set(args):
        if given[-1] == "auto":  # (each job of the sweep starts, continues or keeps its own run: sweep.py)
            return args
        raise ConfigError(f"resume={given[-1]} continues one run; a sweep is continued with resume=auto")
    if given[-1] == "auto":
        return _start_or_resume_arguments(args)
    target = Path(given[-1]).expanduser()
    try:
        checkpoint = find_checkpoint(given[-1])
    except CheckpointError:
        unstarted = stored_overrides(target) is not None and not has_checkpoint(target)
        if given[-1] != "latest" and unstarted:  # (it died before its first checkpoint)
            return _restart_arguments(target.resolve(), args)
        raise
    run_dir = run_dir_of(checkpoint)
    rest = [a for a in args if not a.startswith("resume=")]
    for arg in rest:
        if arg.startswith("hydra.run.dir="):
            if Path(arg.split("=", 1)[1].strip("'\"")).expanduser().resolve() != run_dir:
                raise ConfigError(f"{arg}: resume= continues in the checkpoint's own run dir ({run_dir}); "
                                  "leave out hydra.run.dir")
    rest = [a for a in rest if not a.startswith("hydra.run.dir=")]
    return [*rest, f"resume={_quote(checkpoint)}", f"hydra.run.dir={_quote(run_dir)}", "hydra.output_subdir=null"]


def _start_or_resume_arguments(args: list[str]) -> list[str]:
    """`resume=auto`, for launchers that rerun the same command after a failure or a preemption
    (torchrun --max-restarts, a requeued SLURM job): the run in hydra.run.dir resumed when it has a
    checkpoint, else started there (a run that died before its first checkpoint starts again)."""
    given = [a.split("=", 1)[1].strip("'\"") for a in args if a.startswith("hydra.run.dir=")]
    if not given:
        raise ConfigError("resume=auto starts or continues the run in hydra.run.dir: give one (e.g. "
                          "hydra.run.dir=outputs/my-run); the default run dir is named by the time, new at every start")
    rest = [a for a in args if not a.startswith("resume=")]
    run_dir = Path(given[-1]).expanduser()
    return resume_arguments([*rest, f"resume={run_dir}"]) if has_checkpoint(run_dir) else rest


def _restart_arguments(run_dir: Path, args: list[str]) -> list[str]:
    """The stored command line of a run that died before its first checkpoint, plus the keys given
    now (later ones win), into the same run dir."""
    _restart.add(run_dir)
    extra = [a for a in args if not a.startswith(("resume=", "hydra.run.dir="))]
    return [*stored_overrides(run_dir), *extra, f"hydra.run.dir={_quote(run_dir)}"]


def free_stamp(stamp: str) -> str:
    """The time stamp of a new run's default dir, outputs/<stamp>, suffixed (_2, _3, ...) when a run
    started in the same second has that dir (torchrun's processes agree on it before Hydra starts)."""
    n, free = 1, stamp
    while (Path("outputs") / free).exists() and any((Path("outputs") / free).iterdir()):
        n += 1
        free = f"{stamp}_{n}"
    return free


def distributed_arguments(args: list[str], is_main: bool, stamp: str) -> list[str]:
    """Under torchrun the first process makes and checks the run dir (its time stamp, see train.yaml's
    hydra.run.dir) and writes everything in it; the others run in a scratch dir of their own, so no
    disk need be shared between machines."""
    os.environ[STAMP_ENV] = stamp
    if is_main:
        return args
    scratch = Path(tempfile.mkdtemp(prefix="resnet-train-process-"))  # (Hydra makes a run dir; this one is
    _scratch.add(scratch.resolve())                                    # removed at the end: remove_scratch)
    return [*[a for a in args if not a.startswith("hydra.run.dir=")], f"hydra.run.dir={_quote(scratch)}",
            "hydra.output_subdir=null", "hydra/job_logging=disabled",
            "hydra.callbacks.check_before_run.enabled=false"]  # (preflight.CheckBeforeRun)


def remove_scratch(run_dir: Path) -> None:
    """The scratch dir a process other than the first ran in (distributed_arguments), when it is one."""
    if Path(run_dir).resolve() in _scratch:
        shutil.rmtree(run_dir, ignore_errors=True)
