"""resnet-shards: an image folder (train/, val/, test/ of class folders) or a manifest (a CSV, TSV or
JSON Lines list with a split column) -> WebDataset shards that `dataset=webdataset` trains on, with
the sizes.json and classes.txt that spare it a counting pass."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..data.folders import scan_image_folder
from ..data.manifest import FORMATS, Columns, read_manifests
from ..data.shards import write_dataset
from ..errors import ConfigError, DataError

USAGE = """resnet-shards SOURCE OUT [--max-count N] [--max-size BYTES] [--seed S]

Writes OUT/train-000000.tar, ... (and val-*, test-* for the splits SOURCE has) from an image folder
SOURCE/<split>/<class>/<images>, or from a manifest SOURCE (.csv, .tsv or .jsonl with path and label
columns, and a split column for val and test rows; --path-column, --label-column, --split-column
name them otherwise; its local files only), each sample the file's own bytes under its extension and its class
index as `cls`, shuffled by --seed; then OUT/sizes.json and OUT/classes.txt. Prints the resnet-train
command that trains on them."""

SPLITS = ("train", "val", "test")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line through run_command, not argparse's usage text
        raise ConfigError(f"{message} (resnet-shards --help shows the usage)")


def parse(args: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="resnet-shards", usage=USAGE, description=None)
    parser.add_argument("source", help="an image folder with train/ (and optionally val/, test/), or a manifest")
    parser.add_argument("out", help="the folder the shards are written to")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    parser.add_argument("--seed", type=int, default=0, help="the order samples are written in (default 0)")
    for column in ("path", "label", "split"):
        parser.add_argument(f"--{column}-column", default=column, help=f"a manifest's {column} column")
    parsed = parser.parse_args(args)
    if parsed.max_count < 1 or parsed.max_size <= 0:
        raise ConfigError("--max-count and --max-size must be positive")
    return parsed


def write_shards_command(args: list[str], log=print) -> dict[str, dict[str, int]]:
    """The command: scan SOURCE's splits (the classes are train/'s), write the shards, say how to train."""
    opts = parse(args)
    source, out = Path(opts.source).expanduser(), Path(opts.out).expanduser()
    splits, classes = _listed(source, opts) if source.suffix.lower() in FORMATS else _scanned(source, log)
    written = write_dataset(splits, classes, out, opts.max_count, opts.max_size, opts.seed)
    for split, shards in written.items():
        log(f"{split}: {sum(shards.values()):,} images in {len(shards)} shard(s) {out}/{split}-*.tar")
    log(f"wrote {out / 'sizes.json'} and {out / 'classes.txt'}; train on them with:")
    log("  " + training_command(out, written, classes))
    return written


def _listed(manifest: Path, opts: argparse.Namespace) -> tuple[dict[str, list], list[str]]:
    """A manifest's splits (by its split column) and classes (its training labels)."""
    found = read_manifests({"train": str(manifest)}, Columns(opts.path_column, opts.label_column, opts.split_column),
                           None, set(SPLITS))
    remote = next((path for rows in found.samples.values() for path, _ in rows if "://" in path), None)
    if remote is not None:
        raise DataError(f"{manifest} lists {remote}: resnet-shards packs local files (copy them here first)")
    return {name: rows for name, rows in found.samples.items() if rows}, found.classes


def _scanned(source: Path, log) -> tuple[dict[str, list], list[str]]:
    """An image folder's splits (the classes are train/'s)."""
    if not (source / "train").is_dir():
        raise DataError(f"{source / 'train'} does not exist; resnet-shards reads an image folder "
                        f"{source}/train/<class>/<images> (and val/, test/ when there)")
    train = scan_image_folder(source / "train", log=log)
    index = {c: i for i, c in enumerate(train.classes)}
    splits = {"train": train.samples}
    for name in SPLITS[1:]:
        if (source / name).is_dir():
            splits[name] = scan_image_folder(source / name, index, "train/", log).samples
    return splits, train.classes


def training_command(out: Path, written: dict[str, dict[str, int]], classes: list[str]) -> str:
    """The resnet-train command line for the shards just written."""
    args = ["resnet-train", "dataset=webdataset"]
    for split, shards in written.items():
        last = len(shards) - 1
        args.append(f"dataset.{split}={out}/{split}-{{000000..{last:06d}}}.tar")
    # Each name quoted for Hydra, which would read 01 as 1 and true as a boolean
    names = ",".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in classes)
    args.append(f"dataset.classes=[{names}]" if len(names) <= 400 else f"dataset.num_classes={len(classes)}")
    return " ".join(shlex.quote(a) for a in args)
