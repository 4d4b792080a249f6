"""Writing files so that nothing is ever half-written, and saying why when a write fails.

Every file resnet-train writes (checkpoints, metrics.json, eval.json, summary.csv, predictions)
goes through `atomic_write`: a temporary file beside the target, fsync, rename, fsync of the
folder. A reader -- or a crash at any moment -- sees the old file or the new one. A full disk or
a read-only folder becomes one StorageError naming the file, and the old file stays as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import StorageError

TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)` atomically (see the module docstring)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise storage_error(path, e) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def check_writable(path: Path) -> None:
    """StorageError now, before the work, if `path` could not be written later."""
    folder = _existing_parent(Path(path).parent)
    if not folder.is_dir():  # e.g. output=model.pt/m.onnx: a file where a folder should be
        raise storage_error(Path(path), OSError(errno.ENOTDIR, "Not a directory"))
    if _read_only_mount(folder):
        raise storage_error(Path(path), OSError(errno.EROFS, "Read-only file system"))
    if not os.access(folder, os.W_OK):
        raise storage_error(Path(path), OSError(errno.EACCES, "Permission denied"))


def _read_only_mount(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def storage_error(path: Path, e: OSError | RuntimeError) -> StorageError:
    """One line that names the file and the reason (and how much room is left on a full disk)."""
    code = getattr(e, "errno", None)
    folder = _existing_parent(Path(path).parent)
    if not folder.is_dir():  # (mkdir says "File exists", open "Not a directory")
        return StorageError(f"could not write {path}: {folder} is a file, not a folder")
    free = shutil.disk_usage(folder).free
    # torch's zip writer reports a failed write as "enforce fail at inline_container.cc ...": full if little is left
    torch_write_failed = isinstance(e, RuntimeError) and "inline_container" in str(e) and free < 64 * 2**20
    if code in (errno.ENOSPC, errno.EDQUOT) or torch_write_failed:
        return StorageError(f"could not write {path}: the disk is full ({free / 2**20:.0f} MiB free); "
                            "free some space and run again")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"could not write {path}: {e.strerror.lower()} (the folder is not writable)")
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    return StorageError(f"could not write {path}: {reason}")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders; the rename itself is still atomic
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """JSON, atomically. Non-finite floats (JSON has none) are written as null."""
    text = json.dumps(finite(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files a killed process left behind (`.<name>.<random>.tmp`)."""
    removed = []
    for tmp in Path(directory).rglob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
