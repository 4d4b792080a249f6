"""User-facing errors: one base class, one line each.

Every module raises a subclass of `UserError` for a problem the user can fix (a bad value, a
missing file, a device that is not there). `cli.run_command` is the one place that turns them
into an `error: <message>` line and exit status 2 -- for every command, and for one job of a
sweep (which fails that job and lets the others run). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message is the whole story, on one line where possible."""

    exit_code = 2


class ConfigError(UserError):
    """A config value is missing, of the wrong type or out of range."""


class DeviceError(UserError):
    """The requested device or precision cannot be used on this machine."""


class DataError(UserError):
    """The data the config points at is missing or unusable."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not fit the requested run."""


class ModelError(UserError):
    """Pretrained weights or a freeze point that do not fit the model."""


class RunDirError(UserError):
    """A run directory that cannot be used."""


class RunDirTaken(RunDirError):
    """A run directory that holds another run, or that another process has."""


class StorageError(UserError):
    """A file could not be written: the disk is full, the folder is read-only, ..."""


class TrackerError(UserError):
    """A tracker (MLflow, W&B) that cannot be used when the run starts: not answering, not logged in."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class PeerLost(UserError):
    """Another process of a multi-process run exited or stopped answering (a fault, not a mistake)."""
    exit_code = 1


class ExportError(UserError):
    """A model could not be exported, or the exported file does not give the model's answers."""


def first_line(e: BaseException) -> str:
    """The gist of an exception from a library: its first line, cut to the first sentence if long."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(text) > 160 and ". " in text:
        text = text.split(". ")[0] + "."
    return text[:200]


class Refused(BaseException):
    """Carries a UserError out through Hydra, which catches every Exception -- turning one raised in
    a callback into a warning and printing its own report around a failed run -- but lets a
    BaseException pass. `cli.run_command` prints the carried error."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: torch.OutOfMemoryError, MPS's and the CPU allocator's RuntimeErrors
    (which have no class of their own), Python's MemoryError."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "can't allocate memory")))
