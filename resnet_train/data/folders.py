"""Scanning an ImageFolder tree (`split/<class>/**/<image>`) the way people keep photos: links
followed but never in a loop, one real file counted once, class names compared as text (NFC), every
format Pillow opens, and one line saying what was left out and why -- nothing skipped silently."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image

from ..errors import DataError

# Folders tools leave beside photos: macOS zip resource forks, Jupyter's autosaves.
IGNORED_FOLDERS = frozenset({"__MACOSX", ".ipynb_checkpoints"})
# Formats Pillow registers but cannot decode without outside programs or plugins (it only
# identifies them), so listing them would only fail later.
UNDECODABLE = frozenset({".bufr", ".grib", ".h5", ".hdf", ".emf", ".wmf", ".eps", ".ps", ".mpeg", ".mpg"})


@cache
def image_extensions() -> frozenset[str]:
    """File suffixes of every format this Pillow opens (animated ones give their first frame)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and ext not in UNDECODABLE)


def class_name(folder_name: str) -> str:
    """A class folder's name as text: `café` typed on macOS (NFD) and on Linux (NFC) are one class."""
    return unicodedata.normalize("NFC", folder_name)


@dataclass
class FolderScan:
    samples: list[tuple[str, int]]  # (path as found, class index), in a stable order
    classes: list[str]  # the class folders' names (NFC), sorted
    real_paths: set[str]  # where each sample really is, to compare splits


@dataclass
class _Walk:
    """What a scan has seen: real folders (to refuse loops) and files (to count each once)."""

    root: Path
    registered: list[str] = field(default_factory=list)  # real folders scanned or to be scanned
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # real path -> (path, class) first found at
    scanning: str = ""  # the class folder being scanned
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    example: dict[str, str] = field(default_factory=dict)  # reason -> one path, for the message

    def skip(self, reason: str, path: str, example: str | None = None) -> None:
        self.skipped[reason] += 1
        self.example.setdefault(reason, example or self.relative(path))

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def overlaps(self, real: str) -> bool:
        """A linked folder leading into, onto or above a folder of the scan: following it would
        loop or count (and label) the same images again."""
        return any(_within(real, r) or _within(r, real) for r in self.registered)


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder  # (a plain prefix test misses folder "/")


def scan_image_folder(folder: Path, class_to_idx: dict[str, int] | None = None, classes_from: str = "train/",
                      log=print) -> FolderScan:
    """Samples and class names of `folder/<class>/...`. Without `class_to_idx` this split defines
    the classes; with it (from `classes_from`), a class that it does not know is an error."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; expected {folder}/<class>/<image files>")
    walk = _Walk(folder)
    walk.registered.append(os.path.realpath(folder))
    class_dirs = _class_folders(folder, walk)
    if not class_dirs:
        raise DataError(f"no class folders in {folder}; expected {folder}/<class>/<image files>")
    classes = sorted(class_dirs)
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(f"{folder} has classes that {classes_from} does not: {', '.join(unknown[:10])}")
    index = class_to_idx or {c: i for i, c in enumerate(classes)}
    walk.registered += [os.path.realpath(class_dirs[c]) for c in classes]
    samples = [(path, index[c]) for c in classes for path in _image_files(c, class_dirs[c], walk)]
    if walk.skipped:
        log(f"Skipped in {folder}: {_describe(walk)}")
    if not samples:
        raise DataError(f"no images in the class folders of {folder} (looked for the formats Pillow opens: "
                        f"{', '.join(sorted(image_extensions())[:12])}, ...)")
    if class_to_idx is None:
        check_training_classes(classes, samples, str(folder), lambda name, n: (
            f"class folder {folder / name} has no images ({n} empty in all); add images or remove the folder"))
    return FolderScan(samples, classes, set(walk.files))


def check_training_classes(classes: list[str], samples: list[tuple[object, int]], source: str, empty) -> None:
    """The split that defines the classes (of any source): each needs images (`empty(first class
    without, how many)` says what is wrong), and a classifier two classes at least."""
    counts = Counter(label for _, label in samples)
    missing = [c for i, c in enumerate(classes) if not counts[i]]
    if missing:
        raise DataError(empty(missing[0], len(missing)))
    if len(classes) < 2:
        raise DataError(f"{source} has one class ({classes[0]}); a classifier needs at least two")


def _class_folders(folder: Path, walk: _Walk) -> dict[str, Path]:
    """Class name -> folder, for the visible sub-folders (links followed) of a split."""
    found: dict[str, Path] = {}
    for entry in _entries(str(folder), walk):
        if _ignored(entry, walk):
            continue
        kind = _kind(entry)
        if kind != "folder":
            walk.skip("files outside class folders" if kind == "file" else kind, entry.path)
            continue
        name = class_name(entry.name)
        if name in found:
            raise DataError(f"{folder} has two class folders named {name!r} (the same name in two Unicode "
                            f"spellings: {found[name].name!r} and {entry.name!r}); merge them")
        found[name] = Path(entry.path)
    return found


def _image_files(name: str, top: Path, walk: _Walk) -> list[str]:
    """Image files under one class folder, depth first in name order, each real file once."""
    walk.scanning = name
    found, stack = [], [str(top)]
    while stack:
        subfolders = []
        for entry in _entries(stack.pop(), walk):
            if _ignored(entry, walk):
                continue
            kind = _kind(entry)
            if kind == "folder":
                real = os.path.realpath(entry.path)
                if entry.is_symlink() and walk.overlaps(real):
                    walk.skip("folder links into folders already scanned (a loop or a second copy)", entry.path)
                    continue
                walk.registered.append(real)
                subfolders.append(entry.path)
            elif kind != "file":
                walk.skip(kind, entry.path)
            elif _is_new_image(entry, walk):
                found.append(entry.path)
        stack += reversed(subfolders)
    return found


def _entries(folder: str, walk: _Walk) -> list[os.DirEntry]:
    """A folder's entries in name order; none, said, when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as e:
        walk.skip(f"folders that cannot be listed ({_reason(e)})", folder)
        return []


def _kind(entry: os.DirEntry) -> str:
    """"folder" or "file" (links followed), or why the entry is neither: a link to itself or
    into a folder without permission makes DirEntry's checks raise instead of answer."""
    try:
        if entry.is_dir():
            return "folder"
        if entry.is_file():
            return "file"
        return "broken links" if entry.is_symlink() else "special files"
    except OSError as e:
        return f"links that cannot be followed ({_reason(e)})"


def _reason(e: OSError) -> str:
    return os.strerror(e.errno).lower() if e.errno else str(e)


def _ignored(entry: os.DirEntry, walk: _Walk) -> bool:
    if entry.name in IGNORED_FOLDERS:
        walk.skip(f"{entry.name} folders", entry.path)
        return True
    if entry.name.startswith("."):
        walk.skip("hidden files or folders", entry.path)
        return True
    return False


def _is_new_image(entry: os.DirEntry, walk: _Walk) -> bool:
    suffix = os.path.splitext(entry.name)[1].lower()
    if suffix not in image_extensions():
        walk.skip(f"{suffix or 'suffix-less'} files (not a format Pillow opens)", entry.path)
        return False
    real = os.path.realpath(entry.path)
    if real in walk.files:
        first, first_class = walk.files[real]
        reason = ("files reached twice through links (kept once)" if first_class == walk.scanning else
                  "files in two classes through links (kept in the first class in name order)")
        walk.skip(reason, entry.path, f"{walk.relative(entry.path)} is {walk.relative(first)}")
        return False
    walk.files[real] = (entry.path, walk.scanning)
    return True


def _describe(walk: _Walk) -> str:
    return "; ".join(f"{n:,} {reason} (e.g. {walk.example[reason]})" for reason, n in walk.skipped.most_common())
