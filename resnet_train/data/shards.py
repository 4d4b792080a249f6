"""WebDataset shards (tar files of `<key>.<ext>` members) -> a stream of uint8 batches, for data
larger than a machine: local files, or any URL fsspec opens (s3://, gs://, https://).

The `webdataset` library (the `webdataset` extra) expands brace patterns, reads the tar stream and
groups its members into samples, and writes shards (`write_shards`, with its `ShardWriter`). The
order is ours: webdataset's shuffle draws from Python's global RNG and its workers split shards as
they come, so a resumed epoch would not be the same epoch. Here an epoch's order depends only on
(seed, epoch, processes, workers):

- the shards are permuted by (seed, epoch) and dealt to the run's (process, worker) *slots*: slot s
  of S = processes x workers reads shards s, s+S, ... of that order;
- each slot's samples pass a shuffle buffer seeded by (seed, epoch, slot); a slot whose shards run
  out before the epoch does reads them again (a new order), so every process has the same number of
  batches, floor(images / global batch), whatever its shards hold;
- batch i of a process comes from its worker i mod workers (DataLoader's round robin);
- resuming after `skip` batches replays each slot's samples up to where it stopped, reading (not
  decoding) what it had read: exact, for the cost of reading that part of the epoch again.

Sample counts come from the `sizes.json` that `resnet-shards` writes beside its shards; without
one, every shard is read once before training, which also checks each sample (keys, label) then.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import torch
from PIL import Image

from ..errors import DataError
from ..files import atomic_write
from .loaders import Batch, Shard, device_batches
from .sources import decode_resized
from .transforms import BatchTransform
from .workers import from_workers, worker_init

EXTRA = "pip install 'resnet-train[webdataset]'"
SIZES_FILE = "sizes.json"  # {shard file name: samples} beside the shards, written by resnet-shards
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")  # webdataset's image extensions


def webdataset():
    """The webdataset module, or one line naming the extra that installs it."""
    try:
        import webdataset as wds
    except ImportError:
        raise DataError(f"dataset=webdataset needs the webdataset package: {EXTRA}") from None
    return wds


# --------------------------------------------------------------------------------------------
# Where the shards are, and what a sample holds
# --------------------------------------------------------------------------------------------


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_pattern(pattern: str, key: str, root: str | Path = ".") -> list[str]:
    """The shard URLs of a brace pattern (`shards/train-{000000..000099}.tar`; several joined with
    `::`); relative local paths are under `root`. A local pattern must match existing files."""
    urls = webdataset().shardlists.expand_urls(pattern)
    urls = [str(Path(root).expanduser() / u) if is_local(u) and not u.startswith(("/", "file:", "~")) else u
            for u in urls]
    urls = [str(Path(u).expanduser()) if u.startswith("~") else u for u in urls]
    missing = [u for u in urls if is_local(u) and not Path(local_path(u)).is_file()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"{key}={pattern!r} matches no shard (no file {missing[0] if missing else pattern})")
    if missing:
        raise DataError(f"{key}={pattern!r}: {len(missing)} of its {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


def open_shard(url: str):
    """A readable binary stream of a shard: a local file, or whatever fsspec opens."""
    try:
        if is_local(url):
            return open(local_path(url), "rb")
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError:
        raise DataError(f"reading {url} needs fsspec (and its filesystem for that scheme): {EXTRA}") from None
    except Exception as e:
        raise DataError(f"could not open shard {url}: {e}") from None


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them: {"__key__": ..., "<ext>": bytes, ...}."""
    tariterators = webdataset().tariterators
    stream = open_shard(url)
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        yield from tariterators.group_by_keys(files)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"shard {url} is not a readable tar file ({str(e.args[0]) if e.args else e}); "
                        "a truncated or corrupt shard: write it again") from None
    finally:
        stream.close()


@dataclass(frozen=True)
class SampleFormat:
    """Which members of a sample are its image and label, and what the labels mean."""

    image_keys: tuple[str, ...]  # the first of these extensions a sample has is its image
    label_key: str
    classes: tuple[str, ...]  # the class names; a label is an index into them, or one of them

    def image(self, sample: dict, url: str) -> tuple[bytes, str]:
        """The image bytes and a name for messages (shard:key.ext)."""
        for key in self.image_keys:
            if key in sample:
                return sample[key], f"{url}:{sample['__key__']}.{key}"
        has = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise DataError(f"shard {url}: sample {sample['__key__']} has no image (looked for "
                        f"{', '.join(self.image_keys)}; it has {has}): set dataset.image_key")

    def label(self, sample: dict, url: str) -> int:
        if self.label_key not in sample:
            has = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
            raise DataError(f"shard {url}: sample {sample['__key__']} has no label {self.label_key!r} (it has {has}): "
                            "set dataset.label_key")
        text = sample[self.label_key].decode("utf-8", "replace").strip()
        try:
            index = int(text)
        except ValueError:
            if text in self.classes:
                return self.classes.index(text)
            raise DataError(f"shard {url}: sample {sample['__key__']} has label {text!r}, not one of dataset.classes "
                            f"({', '.join(self.classes[:10])}{', ...' if len(self.classes) > 10 else ''})") from None
        if not 0 <= index < len(self.classes):
            raise DataError(f"shard {url}: sample {sample['__key__']} has label {index}, outside "
                            f"0..{len(self.classes) - 1} ({len(self.classes)} classes: dataset.classes or "
                            "dataset.num_classes)")
        return index

    def check(self, sample: dict, url: str) -> None:
        self.image(sample, url)
        self.label(sample, url)


def decode_sample(sample: dict, url: str, fmt: SampleFormat, size: int,
                  exif_transpose: bool) -> tuple[torch.Tensor, int]:
    """A sample's image as uint8 HWC at `size` (decoded as image files are) and its label."""
    data, name = fmt.image(sample, url)
    return decode_resized(io.BytesIO(data), size, exif_transpose, name=name).permute(1, 2, 0), fmt.label(sample, url)


# --------------------------------------------------------------------------------------------
# Counting samples: the sizes file, else one checking pass
# --------------------------------------------------------------------------------------------


def read_sizes(urls: list[str]) -> list[int] | None:
    """Each shard's sample count from the sizes files beside them, when they list every shard."""
    found: dict[str, dict] = {}
    for url in urls:
        folder = url.rsplit("/", 1)[0] if "/" in url else "."
        if folder not in found:
            found[folder] = _sizes_file(f"{folder}/{SIZES_FILE}")
    counts = []
    for url in urls:
        sizes = found[url.rsplit("/", 1)[0] if "/" in url else "."]
        name = url.rsplit("/", 1)[-1]
        if name not in sizes:
            return None
        counts.append(int(sizes[name]))
    return counts


def _sizes_file(url: str) -> dict:
    try:
        if is_local(url):
            path = Path(local_path(url))
            return json.loads(path.read_text()) if path.is_file() else {}
        import fsspec

        with fsspec.open(url, "r") as f:
            return json.load(f)
    except (OSError, ValueError, ImportError):
        return {}


class _CountShard(torch.utils.data.Dataset):
    """Reads one shard, checking each sample's image and label members: its sample count."""

    def __init__(self, urls: list[str], fmt: SampleFormat):
        self.urls, self.fmt = urls, fmt

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> int:
        n = 0
        for sample in shard_samples(self.urls[i]):
            self.fmt.check(sample, self.urls[i])
            n += 1
        return n


def count_samples(urls: list[str], fmt: SampleFormat, num_workers: int) -> tuple[list[int], str]:
    """Samples per shard, and how they were known (for the log)."""
    counts = read_sizes(urls)
    if counts is not None:
        return counts, SIZES_FILE
    loader = torch.utils.data.DataLoader(_CountShard(urls, fmt), batch_size=None,
                                         num_workers=min(num_workers, len(urls)), worker_init_fn=worker_init())
    return [int(n) for n in from_workers(loader)], f"a pass over the shards (no {SIZES_FILE} beside them)"


# --------------------------------------------------------------------------------------------
# The stream: slots, shuffle buffers, batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split and their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _rng(*parts: int) -> random.Random:
    """A Python RNG seeded by a tuple of ints (never the global one)."""
    value = 0
    for p in parts:
        value = value * 1_000_003 + int(p)
    return random.Random(value)


class _ShardBatches(torch.utils.data.IterableDataset):
    """What each DataLoader worker produces: collated uint8 NHWC batches of its slot."""

    def __init__(self, shards: ShardSet, fmt: SampleFormat, size: int, exif_transpose: bool, batch_size: int,
                 train: bool, seed: int, shard: Shard, num_workers: int, shuffle_buffer: int):
        self.shards, self.fmt, self.size, self.exif_transpose = shards, fmt, size, exif_transpose
        self.batch_size, self.train, self.seed, self.shard = batch_size, train, seed, shard
        self.workers, self.shuffle_buffer = max(1, num_workers), shuffle_buffer
        self.epoch, self.skip = 0, 0

    def num_batches(self) -> int:
        if self.train:
            return self.shards.total // (self.batch_size * self.shard.world_size)
        return sum(-(-n // self.batch_size) for n in self._eval_counts())

    def _eval_counts(self) -> list[int]:
        """Images each worker evaluates (of its shards w, w+workers, ..., every world_size-th image)."""
        mine = [len(range(self.shard.rank, n, self.shard.world_size)) for n in self.shards.counts]
        return [sum(mine[w::self.workers]) for w in range(self.workers)]

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if self.train:
            # DataLoader starts its round robin at worker 0: the worker that makes global batch `skip`
            # (of a resumed epoch) is the one that comes first.
            logical = (worker + self.skip) % self.workers
            return self._train_batches(logical)
        return self._eval_batches(worker)

    def _train_batches(self, logical: int) -> Iterator[Batch]:
        n = self.num_batches()
        done = len(range(logical, self.skip, self.workers))  # its batches before `skip`
        todo = len(range(logical + done * self.workers, n, self.workers))
        samples = self._shuffled(self.shard.rank * self.workers + logical)
        for _ in range(done * self.batch_size):  # replayed, not decoded
            next(samples)
        for _ in range(todo):
            yield self._collate([next(samples) for _ in range(self.batch_size)])

    def _slot_shards(self, slot: int) -> list[int]:
        slots = self.workers * self.shard.world_size
        order = torch.randperm(len(self.shards.urls), generator=torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch + (1 << 40))).tolist()
        return order[slot::slots]

    def _shuffled(self, slot: int) -> Iterator[tuple[dict, str]]:
        """The slot's samples through its shuffle buffer, each of its shards once (the buffer emptied in
        a random order at the end), then again in a new order, endlessly."""
        mine = self._slot_shards(slot)
        rng = _rng(self.seed, self.epoch, slot)
        for round_ in range(1 << 62):
            order = mine if round_ == 0 else _rng(self.seed, self.epoch, slot, round_).sample(mine, len(mine))
            buffer: list[tuple[dict, str]] = []
            read = 0
            for i in order:
                url = self.shards.urls[i]
                for read, sample in enumerate(shard_samples(url), read + 1):
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append((sample, url))
                        continue
                    j = rng.randrange(self.shuffle_buffer)
                    yield buffer[j]
                    buffer[j] = (sample, url)
            if not read:  # (their sizes said otherwise: reading them again would never end)
                raise DataError(f"shards {', '.join(self.shards.urls[i] for i in mine)} hold no samples")
            rng.shuffle(buffer)
            yield from buffer

    def _eval_batches(self, worker: int) -> Iterator[Batch]:
        kept: list[tuple[dict, str]] = []
        for url in self.shards.urls[worker::self.workers]:
            for j, sample in enumerate(shard_samples(url)):
                if j % self.shard.world_size == self.shard.rank:
                    kept.append((sample, url))
                    if len(kept) == self.batch_size:
                        yield self._collate(kept)
                        kept = []
        if kept:
            yield self._collate(kept)

    def _collate(self, samples: list[tuple[dict, str]]) -> Batch:
        decoded = [decode_sample(s, url, self.fmt, self.size, self.exif_transpose) for s, url in samples]
        return torch.stack([image for image, _ in decoded]), torch.tensor([label for _, label in decoded])


def check_slots(shards: ShardSet, num_workers: int, shard: Shard) -> None:
    """Every (process, worker) of a training run reads shards of its own: there must be enough."""
    slots = max(1, num_workers) * shard.world_size
    if len(shards.urls) < slots:
        raise DataError(f"the training split has {len(shards.urls)} shard(s); {shard.world_size} process(es) x "
                        f"{max(1, num_workers)} worker(s) each read shards of their own and need at least {slots}: "
                        "write smaller shards (resnet-shards --max-count) or lower num_workers")


class ShardLoader:
    """Batches of a split in shards, decoded by DataLoader workers, augmented on the device as a
    StreamLoader's are (see the module docstring for the order and what a resume costs)."""

    def __init__(self, shards: ShardSet, fmt: SampleFormat, size: int, exif_transpose: bool, batch_size: int,
                 transform: BatchTransform, train: bool, device: torch.device, seed: int = 0, num_workers: int = 0,
                 shard: Shard = Shard(), shuffle_buffer: int = 1000):
        if train:
            check_slots(shards, num_workers, shard)
        self.batches = _ShardBatches(shards, fmt, size, exif_transpose, batch_size, train, seed, shard, num_workers,
                                     shuffle_buffer)
        self.shards, self.transform, self.train, self.device, self.seed = shards, transform, train, device, seed
        self.batch_size, self.shard, self.image_size, self.num_workers = batch_size, shard, size, num_workers
        self.epoch, self.skip = 0, 0

    @property
    def num_images(self) -> int:
        return self.shards.total

    @property
    def layout(self) -> dict:
        """What a training epoch's order depends on besides (seed, epoch): a resume must keep it."""
        return {"processes": self.shard.world_size, "num_workers": self.num_workers}

    def __len__(self) -> int:
        """Batches in a whole epoch (also when this one starts after `skip` batches)."""
        return self.batches.num_batches()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order and augmentation of `epoch`; start after its first `skip` batches (mid-epoch resume)."""
        self.epoch = self.batches.epoch = epoch
        self.skip = self.batches.skip = skip if self.train else 0

    def __iter__(self) -> Iterator[Batch]:
        # (a DataLoader an epoch: its workers get the dataset as set_epoch left it)
        loader = torch.utils.data.DataLoader(
            self.batches, batch_size=None, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None, worker_init_fn=worker_init(),
            generator=torch.Generator().manual_seed(self.seed))
        return device_batches(self, from_workers(loader))

    def first_images(self, n: int) -> torch.Tensor:
        """The split's first `n` images (uint8 NHWC), in shard order: statistics, export parity checks."""
        images = []
        for url in self.shards.urls:
            for sample in shard_samples(url):
                images.append(decode_sample(sample, url, self.batches.fmt, self.image_size,
                                            self.batches.exif_transpose)[0])
                if len(images) == n:
                    return torch.stack(images)
        return torch.stack(images)


# --------------------------------------------------------------------------------------------
# Writing shards (resnet-shards)
# --------------------------------------------------------------------------------------------


PIL_FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "PPM": "ppm"}


def _member(path: str) -> tuple[str, bytes]:
    """A file as a shard member (extension key, bytes): its own bytes under its extension when that is
    an image key readers look for, else under its format's usual one (.jfif -> jpg); a format without
    one (.tga, .ico, ...) is converted to PNG (lossless), so every file of a folder trains from shards."""
    suffix = Path(path).suffix.lower().lstrip(".")
    try:
        data = Path(path).read_bytes()
        if suffix in IMAGE_KEYS:
            return suffix, data
        with Image.open(io.BytesIO(data)) as im:
            if im.format in PIL_FORMAT_KEYS:
                return PIL_FORMAT_KEYS[im.format], data
            png = io.BytesIO()
            im.save(png, "PNG")
            return "png", png.getvalue()
    except OSError as e:
        raise DataError(f"could not read image {path}: {e.strerror or e}") from None


def write_dataset(splits: dict[str, Sequence[tuple[str, int]]], classes: Sequence[str], out: Path,
                  max_count: int = 1000, max_size: float = 1e9, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write each split's (image file, class index) samples as shards in `out` (`write_shards`), then
    `sizes.json` (every shard's sample count: training starts without reading the shards) and
    `classes.txt` (one class name a line, in index order). Any source of samples can be written
    this way: an image folder (resnet-shards), a manifest. Returns {split: {shard: samples}}."""
    existing = sorted(p.name for split in splits for p in out.glob(f"{split}-*.tar"))
    for stale in (p for split in splits for p in out.glob(f".{split}-*.tar.partial")):
        stale.unlink()  # (left by a killed writer)
    if existing:
        raise DataError(f"{out} already has shards ({existing[0]}, ...): write into an empty folder or remove "
                        "them first")
    written = {split: write_shards(samples, out, split, max_count, max_size, seed) for split, samples in splits.items()}
    sizes = {name: n for shards in written.values() for name, n in sorted(shards.items())}
    atomic_write(out / SIZES_FILE, lambda f: f.write(json.dumps(sizes, indent=1).encode()))
    atomic_write(out / "classes.txt", lambda f: f.write("".join(f"{c}\n" for c in classes).encode()))
    return written


def write_shards(samples: Sequence[tuple[str, int]], out: Path, split: str, max_count: int = 1000,
                 max_size: float = 1e9, seed: int = 0) -> dict[str, int]:
    """Write (image file, class index) `samples` as `out/<split>-000000.tar`, ... with webdataset's
    ShardWriter: the file's own bytes (no re-encoding) under its extension, the class index as `cls`,
    in an order shuffled by `seed` (a folder lists one class after another; a shard should not).
    Each shard is written under a hidden temporary name and renamed when complete, so a killed
    writer leaves no shard that looks whole. Returns {shard file name: samples}."""
    wds = webdataset()
    out.mkdir(parents=True, exist_ok=True)
    if not samples:
        return {}
    order = list(range(len(samples)))
    _rng(seed).shuffle(order)
    sizes: dict[str, int] = {}
    counting: dict[str, int] = {}

    def finished(partial: str) -> None:  # a whole shard: its own name
        final = Path(partial).with_name(Path(partial).name[1:].removesuffix(".partial"))
        Path(partial).replace(final)
        sizes[final.name] = counting.pop(partial)

    writer = wds.ShardWriter(str(out / f".{split}-%06d.tar.partial"), maxcount=max_count, maxsize=max_size,
                             post=finished, verbose=0, encoder=False)
    try:
        for n, i in enumerate(order):
            path, label = samples[i]
            key, data = _member(path)
            writer.write({"__key__": f"{split}{n:08d}", key: data, "cls": str(label).encode()})
            counting[writer.fname] = counting.get(writer.fname, 0) + 1
    except BaseException:  # the shard being written keeps no name of a shard unless it is full
        if writer.count < writer.maxcount and writer.size < writer.maxsize:
            writer.post = None
        writer.close()
        Path(writer.fname).unlink(missing_ok=True)
        raise
    writer.close()
    return sizes
