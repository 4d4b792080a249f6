"""Manifests: CSV, TSV or JSON Lines files listing images and their labels, one row each.

A row's path is relative to the manifest's folder, absolute, or a URL fsspec opens (s3://, gs://,
https://, file://). The splits come from one manifest each (dataset.train/val/test) or from one
manifest with a split column. Every bad row is one error naming the manifest and its line.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import DataError
from .folders import check_training_classes

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".ndjson": None, ".json": None}


@dataclass(frozen=True)
class Columns:
    path: str = "path"
    label: str = "label"
    split: str = "split"  # only read when one manifest holds every split


@dataclass
class Manifests:
    """The samples of each split read, as (path or URL, class index), and the class names."""

    samples: dict[str, list[tuple[str, int]]]
    classes: list[str]
    files: dict[str, Path]  # the manifest each split came from


def read_manifests(files: dict[str, str | None], columns: Columns, classes: Sequence[str] | None,
                   splits: set[str]) -> Manifests:
    """The splits in `splits` (and train when the classes come from its labels) from `files`
    (split -> manifest; without val and test files, a split column of the train manifest decides)."""
    if not files.get("train") and (classes is None or any(not files.get(s) for s in splits)):
        raise DataError("dataset.train is required: a CSV, TSV or JSON Lines file listing the training images "
                        "(dataset.train=train.csv)")
    one_file = not files.get("val") and not files.get("test")
    wanted = set(splits) | ({"train"} if classes is None else set())
    rows: dict[str, list[_Row]] = {}
    paths: dict[str, Path] = {}
    if one_file:
        path = _manifest_path(files["train"], "train")
        for row in _rows(path, columns, listed_as=None):
            rows.setdefault(row.split, []).append(row)
        paths = {name: path for name in ("train", "val", "test")}
    else:
        for name in sorted(wanted):
            if files.get(name):
                paths[name] = _manifest_path(files[name], name)
                rows[name] = list(_rows(paths[name], columns, listed_as=name))
    if "train" in rows and not rows["train"]:
        raise DataError(f"{paths['train']} lists no training images")
    names = [str(c) for c in classes] if classes is not None else sorted_labels({r.label for r in rows.get("train", [])})
    index = {name: i for i, name in enumerate(names)}
    samples = {name: _labelled(rows[name], index, classes is not None or name != "train")
               for name in wanted if name in rows}
    if classes is None:
        check_training_classes(names, samples["train"], str(paths["train"]), lambda name, n: (
            f"{paths['train']} lists no training images of class {name!r} ({n} such classes)"))
    return Manifests(samples, names, paths)


@dataclass(frozen=True)
class _Row:
    where: str  # manifest:line, for errors
    path: str
    label: str
    split: str


def _manifest_path(value: str, split: str) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"dataset.{split}={value}: no such manifest file ({path})")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"dataset.{split}={value}: a manifest is a .csv, .tsv or .jsonl file (JSON Lines: one "
                        "object a line)")
    return path


def _rows(path: Path, columns: Columns, listed_as: str | None) -> Iterator[_Row]:
    """The manifest's rows with their paths resolved, of split `listed_as` (None: as its split column
    says, train where empty); a row that is incomplete or of another split is an error."""
    for line, record in _records(path):
        where = f"{path}:{line}"
        for key, name in ((columns.path, "path_column"), (columns.label, "label_column")):
            if key not in record:
                raise DataError(f"{where}: no {key!r} column (the columns: {', '.join(map(str, record))}); name "
                                f"yours with dataset.{name}=...")
        value = {key: _text(record.get(key)) for key in (columns.path, columns.label, columns.split)}
        if not value[columns.path]:
            raise DataError(f"{where}: the {columns.path!r} column is empty")
        if not value[columns.label]:
            raise DataError(f"{where}: the {columns.label!r} column is empty ({value[columns.path]})")
        split = listed_as or "train"
        if value[columns.split]:
            split = SPLIT_NAMES.get(value[columns.split].lower())
            if split is None:
                raise DataError(f"{where}: split {value[columns.split]!r} is not train, val (or validation) or test")
            if listed_as and split != listed_as:  # (its other rows would train, or test, as dataset.<listed_as>'s)
                raise DataError(f"{where}: a {split} row in the manifest given as dataset.{listed_as}; give one "
                                f"manifest with a {columns.split} column alone (dataset.train=...), or one per split")
        image = _image_path(value[columns.path], path.parent)
        if "://" not in image and not os.path.isfile(image):
            raise DataError(f"{where}: {image} does not exist")
        yield _Row(where, image, value[columns.label], split)


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, {column: value}) of each row of a CSV/TSV (with a header) or JSON Lines file."""
    delimiter = FORMATS[path.suffix.lower()]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if delimiter is None:
                for line, text in enumerate(f, 1):
                    if text.strip():
                        yield line, _json_object(text, path, line)
                return
            reader = csv.DictReader(f, delimiter=delimiter)
            for record in reader:
                yield reader.line_num, record
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: {e}") from None


def _json_object(text: str, path: Path, line: int) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: not a JSON object ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line}: not a JSON object (one object a line, e.g. "
                        '{"path": "cats/1.jpg", "label": "cat"})')
    return record


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _image_path(value: str, folder: Path) -> str:
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


def sorted_labels(labels: set[str]) -> list[str]:
    """Class names in order: numerically when every label is an integer (2 before 10), else as text."""
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _labelled(rows: list[_Row], index: dict[str, int], known: bool) -> list[tuple[str, int]]:
    for row in rows:
        if row.label not in index:
            origin = "dataset.classes" if known else "the training split's labels"
            raise DataError(f"{row.where}: label {row.label!r} is not one of {origin} "
                            f"({', '.join(list(index)[:10])}{', ...' if len(index) > 10 else ''})")
    return [(row.path, index[row.label]) for row in rows]
