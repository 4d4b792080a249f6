"""Hugging Face datasets: a folder written by `save_to_disk`, a folder of parquet/arrow files (the
splits named by the files, as `load_dataset` reads them) or a Hub name. Rows are read by index
from the memory-mapped Arrow tables and decoded by our own rules (EXIF, 16-bit, resize + crop), as
files are; the class names come from the label column's ClassLabel feature when it has one."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ..errors import DataError, first_line
from .folders import check_training_classes
from .manifest import sorted_labels
from .sources import Listing, splits_to_read

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError('dataset=hf needs the datasets library: pip install "resnet-train[hf]"') from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def load_splits(path: str) -> dict[str, Any]:
    """Our split name -> the dataset's split, for the splits it has."""
    datasets = _datasets()
    folder = Path(path).expanduser()
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
        elif folder.is_dir():
            loaded = datasets.load_dataset(str(folder))
        elif path.startswith((".", "/", "~")):
            raise DataError(f"dataset.path={path}: no such folder")
        else:
            loaded = datasets.load_dataset(path)  # a Hub name (needs the network)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"dataset.path={path}: could not load a dataset ({first_line(e)})") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    found = {ours: loaded[theirs] for ours, names in SPLIT_NAMES.items() for theirs in names if theirs in loaded}
    if not found:
        raise DataError(f"dataset.path={path} has splits {', '.join(loaded)}; expected train (and validation, test)")
    return found


class Rows:
    """Opens the image of a row (split, index) of the dataset's image column."""

    def __init__(self, splits: dict[str, Any], column: str, path: str):
        self.splits = {name: _image_column(split, column) for name, split in splits.items()}
        self.column, self.path = column, path

    @contextlib.contextmanager
    def open(self, ref: tuple[str, int]) -> Iterator[Image.Image]:
        value = self.splits[ref[0]][ref[1]][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            value = io.BytesIO(value)
        if value is None:
            raise DataError(f"could not read image {self.name(ref)}: the {self.column!r} column is empty")
        with Image.open(value) as im:
            yield im

    def name(self, ref: tuple[str, int]) -> str:
        return f"row {ref[1]} of the {ref[0]} split of {self.path}"


def _image_column(split: Any, column: str) -> Any:
    """The split's image column alone, as encoded bytes (or a path): decoded by us, not by `datasets`."""
    datasets = _datasets()
    if column not in split.column_names:
        raise DataError(f"dataset.image_column={column}: the dataset has no such column (its columns: "
                        f"{', '.join(split.column_names)})")
    split = split.select_columns([column])
    if isinstance(split.features[column], datasets.Image):
        return split.cast_column(column, datasets.Image(decode=False))
    return split


def list_hf_dataset(dataset: Any, needed: set[str], log) -> Listing:
    """The Listing of the splits a command needs (see data._list_images)."""
    splits = load_splits(dataset.path)
    needed = splits_to_read(needed, "val" in splits, dataset.val_size)
    if dataset.classes is None:
        needed |= {"train"}
    if set(dataset.splits) == {"test"} and "test" not in splits:
        raise DataError(f"dataset.path={dataset.path} has no test split to evaluate (split=val evaluates the "
                        "validation images)")
    if "train" in needed and "train" not in splits:
        raise DataError(f"dataset.path={dataset.path} has no train split (its splits: {', '.join(splits)})")
    read = {name: splits[name] for name in needed if name in splits}
    classes, index = _classes(read, dataset)
    samples: dict[str, list] = {}
    for name, split in read.items():
        if dataset.label_column not in split.column_names:
            raise DataError(f"dataset.label_column={dataset.label_column}: the {name} split has no such column "
                            f"(its columns: {', '.join(split.column_names)})")
        labels = split[dataset.label_column]
        if name != "train" and all(label is None or label == -1 for label in labels):
            log(f"the {name} split of {dataset.path} has no labels (-1 or empty, as a hidden test split's): left out")
            continue
        for row, label in enumerate(labels):
            if index(label) is None:
                raise DataError(f"row {row} of the {name} split of {dataset.path}: label {label!r} is not one of the "
                                f"classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        samples[name] = [((name, row), index(label)) for row, label in enumerate(labels)]
    if dataset.classes is None:
        check_training_classes(classes, samples["train"], f"the train split of {dataset.path}", lambda name, n: (
            f"the train split of {dataset.path} has no images of class {name!r} ({n} such classes)"))
    val_where = f"the validation split of {dataset.path} ({len(samples['val']):,} images)" if "val" in samples else ""
    read = {name: split for name, split in read.items() if name in samples}
    return Listing(samples, classes, str(dataset.path), val_where, Rows(read, dataset.image_column, dataset.path))


def _classes(splits: dict[str, Any], dataset: Any) -> tuple[list[str], Any]:
    """The class names, and label value -> class index (None: not a class): the ClassLabel's names
    (labels are their indices), dataset.classes, or the training labels sorted."""
    feature = next((s.features.get(dataset.label_column) for s in splits.values()), None)
    if isinstance(feature, _datasets().ClassLabel):
        names = feature.names
        classes = [str(c) for c in dataset.classes] if dataset.classes is not None else list(names)
        if classes != list(names):
            raise DataError(f"dataset.classes does not match the dataset's ClassLabel names ({', '.join(names[:10])})")
        return classes, lambda label: label if isinstance(label, int) and 0 <= label < len(classes) else None
    if dataset.classes is not None:
        classes = [str(c) for c in dataset.classes]
    else:
        classes = sorted_labels({str(label) for label in splits["train"][dataset.label_column] if label is not None})
    position = {name: i for i, name in enumerate(classes)}
    return classes, lambda label: position.get(str(label)) if label is not None else None
