"""Data on disk: CIFAR-10/100 (through torchvision, with its integrity check) and image folders
(decoded to uint8 RGB at a size), and the validation split held out of training."""

from __future__ import annotations

import contextlib
import math
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError
from ..progress import progress_bar
from .workers import from_workers, worker_init


@dataclass
class Split:
    """Images of one split: decoded (`images`, uint8 NHWC) or as samples `reader` opens (file paths,
    URLs, a dataset's rows)."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    samples: list[tuple[Any, int]] | None = None  # (what `reader` opens: a path, a URL, a row; class index)
    reader: Any = None  # opens the samples' images (None: FILES)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.labels[idx],
                     None if self.images is None else self.images[idx],
                     None if self.samples is None else [self.samples[i] for i in idx.tolist()], self.reader)


@dataclass
class Listing:
    """The images of a source's splits, before any is decoded: (what `reader` opens, class index)."""

    samples: dict[str, list[tuple[Any, int]]]  # split -> samples, for the splits read
    classes: list[str]
    where: str  # the source, as the log names it
    val_where: str = ""  # a validation split of its own, as the log names it ("": none)
    reader: Any = None  # opens a sample's image (None: files and URLs)


def splits_to_read(splits: set[str], has_own_val: bool, val_size: int | float) -> set[str]:
    """The splits a command reads: `splits`, and where validation comes from without a val split
    of its own -- the test split (val_size=0) or the training split it is held out of."""
    if "val" in splits and not has_own_val:
        return splits | ({"test"} if val_size == 0 else {"train"})
    return set(splits)


CIFAR = {"cifar10": (datasets.CIFAR10, "CIFAR-10"), "cifar100": (datasets.CIFAR100, "CIFAR-100")}


def load_cifar(name: str, root: str | Path, download: bool) -> tuple[Split, Split, list[str]]:
    """CIFAR-10/100 train and test splits from `root/cifar-10(0)-batches-py` (downloaded if allowed)."""
    cls, title = CIFAR[name]
    root = Path(root).expanduser().resolve()
    folder = root / cls.base_folder
    try:
        train = cls(root, train=True, download=False)
    except RuntimeError:
        if not download:
            raise DataError(_cifar_help(cls, title, root, folder, "dataset.download=false")) from None
        try:
            train = _quiet_download(cls, root)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise DataError(_cifar_help(cls, title, root, folder, f"downloading it failed ({_reason(e)})")) from None
    except Exception as e:  # unreadable pickles
        raise DataError(f"{title} files in {folder} could not be read ({e}); delete them to download again") from None
    test = cls(root, train=False)

    def split(ds) -> Split:
        return Split(torch.as_tensor(ds.targets, dtype=torch.int64),
                     images=torch.from_numpy(np.ascontiguousarray(ds.data)))
    return split(train), split(test), list(train.classes)


def _quiet_download(cls, root: Path):
    """Download into `root`; a failed download leaves no empty folders behind."""
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        return cls(root, train=True, download=True)
    except BaseException:
        for p in created:  # deepest first
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e)


def _cifar_help(cls, title: str, root: Path, folder: Path, why: str) -> str:
    state = "has files that failed the integrity check" if folder.is_dir() else "does not exist"
    return (f"no usable {title} in dataset.root={root}: {folder} {state}, and {why}. To provide it offline, "
            f"fetch {cls.url} on a machine with internet and put {cls.filename} into {root} (or extract it there, "
            f"giving {folder}/), or point dataset.root at a folder that contains {cls.base_folder}/")


class Files:
    """Opens images named by a path, by a URL fsspec opens (s3://, gs://, https://, file://), or
    given as a file object (a shard's sample's bytes)."""

    def open(self, ref: str | BinaryIO) -> contextlib.AbstractContextManager[Image.Image]:
        return _opened_url(ref) if isinstance(ref, str) and "://" in ref else Image.open(ref)

    def name(self, ref: str | BinaryIO) -> str:
        return ref if isinstance(ref, str) else str(getattr(ref, "name", "an image's bytes"))


FILES = Files()


@contextlib.contextmanager
def _opened_url(url: str) -> Iterator[Image.Image]:
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: reading images from URLs needs fsspec: pip install fsspec") from None
    with fsspec.open(url, "rb") as f, Image.open(f) as im:
        yield im


def decode_resized(ref: Any, size: int, exif_transpose: bool = True, reader: Any = FILES,
                   name: str | None = None) -> torch.Tensor:
    """Decode one image (a file's path or URL, its bytes in a file object, or what `reader` opens) as
    RGB uint8 CHW, shorter side resized to `size`, center-cropped square; turned upright first as its
    EXIF orientation says (phone photos are stored sideways). Errors name `name` (default: the reader's)."""
    name = name or reader.name(ref)
    try:
        with reader.open(ref) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the image is much larger
            img = TF.pil_to_tensor(_as_8bit_rgb(_upright(im) if exif_transpose else im, name))
    except (DataError, MemoryError):
        raise
    except Exception as e:
        raise DataError(f"could not read image {name}: {e}") from None
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), size)
    return img


def _upright(im: Image.Image) -> Image.Image:
    """Turned as its EXIF orientation says; as stored when that tag cannot be read (the pixels can)."""
    try:
        return ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError):
        return im


def _as_8bit_rgb(im: Image.Image, path: str) -> Image.Image:
    """RGB with 8 bits per channel. PIL's convert("RGB") clips 16-bit grayscale (mode I;16, I) at 255
    -- a 0..65535 gradient becomes almost all white -- so those are scaled down (>> 8) first."""
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"could not read image {path}: {im.mode} pixel values outside 0..65535 "
                            "(convert it to an 8- or 16-bit image)")
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise DataError(f"could not read image {path}: floating-point pixels (mode F) have no fixed range; "
                        "convert it to an 8- or 16-bit image")
    return im.convert("RGB")


class DecodedFiles(torch.utils.data.Dataset):
    """Files → uint8 HWC tensors at `size` x `size` (shorter side resized, then center-cropped)."""

    def __init__(self, samples: list[tuple[Any, int]], size: int, exif_transpose: bool = True, reader: Any = None):
        self.samples, self.size, self.exif_transpose, self.reader = samples, size, exif_transpose, reader or FILES

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        ref, label = self.samples[i]
        return decode_resized(ref, self.size, self.exif_transpose, self.reader).permute(1, 2, 0), label


CHUNK_BYTES = 32 * 1024 ** 2  # decoded images handled at a time: decoding batches, statistics chunks


DECODE_BATCH = 256  # files a worker decodes per task at most: small images still keep every worker busy


def images_per_chunk(bytes_per_image: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // bytes_per_image)


def decoded_chunks(samples: list[tuple[Any, int]], size: int, num_workers: int, exif_transpose: bool = True,
                   progress: bool | None = False, reader: Any = None) -> Iterator[torch.Tensor]:
    """The images decoded in order, in parallel, as uint8 NHWC chunks of a few tens of MB."""
    loader = torch.utils.data.DataLoader(DecodedFiles(samples, size, exif_transpose, reader),
                                         batch_size=min(DECODE_BATCH, images_per_chunk(size * size * 3)),
                                         num_workers=num_workers,
                                         worker_init_fn=worker_init())
    with progress_bar(progress=progress, total=len(samples), desc="decoding", unit="img") as bar:
        for images, _ in from_workers(loader):
            bar.update(len(images))
            yield images


def decode_all(samples: list[tuple[Any, int]], size: int, num_workers: int, exif_transpose: bool = True,
               progress: bool | None = False, reader: Any = None) -> torch.Tensor:
    """Decode every image once into one uint8 NHWC tensor, the only full-size copy."""
    out = torch.empty((len(samples), size, size, 3), dtype=torch.uint8)
    i = 0
    for images in decoded_chunks(samples, size, num_workers, exif_transpose, progress, reader):
        out[i:i + len(images)] = images
        i += len(images)
    return out


class _Header(torch.utils.data.Dataset):
    """Opens an image and reads its header (format, size, mode): None when it can be decoded, else why not."""

    def __init__(self, refs: list[Any], reader: Any):
        self.refs, self.reader = refs, reader

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> str | None:
        ref = self.refs[i]
        try:
            with self.reader.open(ref) as im:
                if im.mode == "F" or min(im.size) < 1:
                    return f"{self.reader.name(ref)} ({'floating-point pixels' if im.mode == 'F' else 'an empty image'})"
        except Exception as e:
            return f"{self.reader.name(ref)} ({e})"
        return None


def _count_and_problems(batch: list[str | None]) -> tuple[int, list[str]]:
    return len(batch), [p for p in batch if p]


def check_readable(refs: list[Any], num_workers: int, progress: bool | None = False, reader: Any = None) -> None:
    """Read every image's header (in parallel) so a broken file stops a streamed run before training,
    not when an epoch, or the final test, reaches it."""
    loader = torch.utils.data.DataLoader(_Header(refs, reader or FILES), batch_size=256, num_workers=num_workers,
                                         collate_fn=_count_and_problems, worker_init_fn=worker_init())
    problems = []
    with progress_bar(progress=progress, total=len(refs), desc="checking files", unit="file") as bar:
        for count, found in loader:
            problems += found
            bar.update(count)
    if problems:
        more = f"; and {len(problems) - 1:,} more" if len(problems) > 1 else ""
        raise DataError(f"could not read image {problems[0]}{more}: remove or replace them before training")


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with `val_size` val images drawn per class in proportion to its size."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    classes, counts = labels.unique(return_counts=True)
    share = counts.double() * val_size / n
    quota = share.floor().long()
    leftover = val_size - int(quota.sum())
    quota[torch.argsort(share - quota, descending=True, stable=True)[:leftover]] += 1  # largest remainders
    shuffled = labels[perm]
    val = torch.cat([perm[shuffled == c][:q] for c, q in zip(classes.tolist(), quota.tolist())])
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().squeeze(1), val.sort().values


def channel_stats(images: torch.Tensor | Iterable[torch.Tensor],
                  chunk_bytes: int = CHUNK_BYTES) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale, unbiased) of uint8 NHWC images (one tensor, or chunks
    of them as they are decoded), from exact integer sums over parts of a few MB: their int64 copies
    take 8x, so the parts, not the set, bound the memory. No float64 on any device."""
    chunks = [images] if isinstance(images, torch.Tensor) else images
    total = squares = 0
    n = 0
    for chunk in chunks:
        for part in chunk.split(images_per_chunk(chunk[0].numel(), chunk_bytes // 8)):
            x = part.reshape(-1, part.shape[-1]).long()
            total, squares, n = total + x.sum(0), squares + (x * x).sum(0), n + len(x)
    total, squares = total.tolist(), squares.tolist()
    mean = [s / n / 255 for s in total]
    std = [math.sqrt(max(q - s * s / n, 0) / max(n - 1, 1)) / 255 for s, q in zip(total, squares)]
    return mean, std
