#!/usr/bin/env python
"""Training throughput of resnet-train's loop against the model's own compute and a tutorial loop.

Three loops, same model, batch and device, measured in one run:
  pure step     forward + loss + backward + SGD step on one random batch already on the device, in
                resnet-train's precision and memory format: the ceiling for any loop.
  resnet-train  `engine.train_one_epoch` over the in-memory data path: per-batch crop/flip/normalize on
                the device, lr schedule, loss/accuracy accumulated on the device.
  tutorial      the loop the PyTorch tutorials teach: fp32, NCHW, per-image PIL RandomCrop/Flip/ToTensor/
                Normalize in a DataLoader with 2 workers, `.item()` every step.

    python scripts/benchmark.py --model resnet20 --batch-size 128
    python scripts/benchmark.py --model resnet18 --data ../shared/data/cifar10-jpeg --json out.json
    python scripts/benchmark.py --model resnet20 --augment cutout,trivialaugment,randaugment,autoaugment

Prints a markdown table (images/s and the two ratios) and writes the same numbers as JSON.

With --photos FOLDER (an ImageFolder root: FOLDER/train/<class>/*.jpg, e.g. one made by
scripts/make_photo_folder.py) it times instead, at --image-size (224) with --num-workers decoding
processes, the same model, batch, precision and device on photos streamed from disk:
  pure step           as above, on a random batch at the image size (the model with the imagenet stem
                      above 64px, as model.stem=auto picks)
  resnet-train        `train_one_epoch` over resnet-train's stream path: `build_data` with
                      loader=stream, files decoded and resized to the image size in the workers, the
                      --photo-augment option (default: basic, the config's default) on the device
  torchvision         datasets.ImageFolder with the tutorial's transforms (RandomResizedCrop(size),
                      RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader(shuffle=True) with
                      the same workers, fed to the same `train_one_epoch` step
  ... loader only     each loader alone, no model: batches ready for the model (normalized, on the
                      device); also torchvision's Resize + CenterCrop, the decode work ours does
Warm-up and timed batches come from one pass over the folder (workers started, queues filled), so
the folder needs (--warmup + --steps) * --batch-size images.

    python scripts/make_photo_folder.py ../photos --images 2000 --size 400x300
    python scripts/benchmark.py --photos ../photos --model resnet18 --batch-size 32 --num-workers 2
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from resnet_train import device as devices
from resnet_train.data import (
    Augment,
    Batching,
    BatchTransform,
    DatasetSpec,
    MemoryLoader,
    build_data,
    decode_all,
)
from resnet_train.engine import OptimizerStep, train_one_epoch
from resnet_train.models import ARCHITECTURES
from resnet_train.optim import Scheduler, cosine

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# the augment config group's options (configs/augment/*.yaml), as the data path takes them
AUGMENT_OPTIONS = {"basic": Augment(), "cutout": Augment(cutout=16), "trivialaugment": Augment(policy="trivialaugment"),
                   "randaugment": Augment(policy="randaugment"), "autoaugment": Augment(policy="autoaugment"),
                   "resized_crop": Augment(crop="resized", color_jitter=0.4)}


def make_model(name: str, device: torch.device, channels_last: bool, num_classes: int = 10,
               stem: str = "cifar") -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHITECTURES[name](num_classes=num_classes, stem=stem)
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(device: torch.device) -> str:
    return devices.describe(device) + (f" ({platform.processor() or platform.machine()}, "
                                       f"{torch.get_num_threads()} threads)" if device.type == "cpu" else "")


def pure_step(args, device, precision, channels_last, size: int = 32, num_classes: int = 10,
              stem: str = "cifar") -> float:
    model = make_model(args.model, device, channels_last, num_classes, stem)
    if args.compile:
        model = torch.compile(model)
    opt = sgd(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (args.batch_size,), device=device)

    def step():
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def ours(args, images, labels, device, precision, channels_last, augment: Augment = Augment()) -> float:
    """resnet-train's own epoch function over its in-memory loader (warm-up epoch, then a timed one)."""
    model = make_model(args.model, device, channels_last)
    if args.compile:
        model = torch.compile(model)
    opt = sgd(model)
    n = args.steps * args.batch_size
    transform = BatchTransform(MEAN, STD, augment, channels_last=channels_last)
    n_warm = args.warmup * args.batch_size
    warm = MemoryLoader(images[:n_warm].to(device), labels[:n_warm].to(device), args.batch_size, transform, train=True)
    loader = MemoryLoader(images[:n].to(device), labels[:n].to(device), args.batch_size, transform, train=True)
    step = OptimizerStep(model, opt, Scheduler(opt, cosine(10), len(loader)), precision)
    train_one_epoch(step, warm, progress=False)
    sync(device)
    result, _ = train_one_epoch(step, loader, progress=False)
    return result.images_per_second


class _PILImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does: a uint8 array in memory, a PIL image per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def tutorial(args, images, labels, device) -> float:
    """The tutorial loop: fp32, NCHW, PIL transforms in 2 DataLoader workers, .item() every step."""
    model = make_model(args.model, device, channels_last=False)
    opt = sgd(model)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    n = (args.warmup + args.steps) * args.batch_size
    if args.data:  # images read from disk every epoch, as with torchvision.datasets.ImageFolder
        subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n].tolist()
        dataset = torch.utils.data.Subset(datasets.ImageFolder(Path(args.data) / "train", transform=transform), subset)
    else:
        dataset = _PILImages(images[:n].numpy(), labels[:n].numpy(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=2,
                                         drop_last=True, pin_memory=device.type == "cuda")
    model.train()
    running = 0.0
    for i, (x, y) in enumerate(loader):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        running += loss.item()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def load_images(args) -> tuple[torch.Tensor, torch.Tensor]:
    n = (args.warmup + args.steps) * args.batch_size
    if args.data:
        samples = datasets.ImageFolder(Path(args.data) / "train").samples
        pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))[:n].tolist()
        chosen = [samples[i] for i in pick]
        return decode_all(chosen, 32, num_workers=2), torch.tensor([label for _, label in chosen])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------------------------
# --photos: a folder of photos streamed from disk by DataLoader workers
# --------------------------------------------------------------------------------------------


def photo_stem(size: int) -> str:
    """The stem model.stem=auto gives a model trained from scratch: cifar up to 64px, imagenet above."""
    return "cifar" if size <= 64 else "imagenet"


class _Take:
    """The next `n` batches of a running iterator, as a loader for `train_one_epoch` (len + iter):
    warm-up and timed batches come from one pass, so the timed ones find the workers started."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.batches, self.n)


def stream_batches(args, device, channels_last):
    """resnet-train's stream path as a run builds it (dataset=image_folder dataset.loader=stream):
    (batches of one training epoch, number of batches, number of classes)."""
    spec = DatasetSpec(name="image_folder", root=args.photos, image_size=args.image_size, mean=MEAN, std=STD,
                       val_size=0, loader="stream")  # mean/std given: no statistics pass; val_size=0: all of train
    batching = Batching(args.batch_size, args.batch_size, AUGMENT_OPTIONS[args.photo_augment], seed=0,
                        num_workers=args.num_workers, channels_last=channels_last)
    data = build_data(spec, batching, device, log=lambda message: None)
    return iter(data.train), len(data.train), len(data.classes)


TV_TRAIN = "RandomResizedCrop + flip"
TV_RESIZE = "Resize + CenterCrop"


def torchvision_batches(args, device, channels_last, transform: str = TV_TRAIN):
    """torchvision's ImageFolder + DataLoader, batches moved to the device in the model's memory
    format: (batches of one epoch, number of batches, number of classes)."""
    size = args.image_size
    first = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if transform == TV_TRAIN
             else [T.Resize(size), T.CenterCrop(size)])
    dataset = datasets.ImageFolder(Path(args.photos) / "train",
                                   transform=T.Compose([*first, T.ToTensor(), T.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.num_workers, drop_last=True,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def batches():
        for x, y in loader:
            yield (x.to(device, non_blocking=True).contiguous(memory_format=fmt),
                   y.to(device, non_blocking=True))
    return batches(), len(loader), len(dataset.classes)


def _check_length(args, n_batches: int) -> None:
    if args.warmup + args.steps > n_batches:
        raise SystemExit(f"{args.photos}/train gives {n_batches} batches of {args.batch_size}; --warmup "
                         f"{args.warmup} + --steps {args.steps} need more: lower them or make a bigger folder "
                         "(scripts/make_photo_folder.py)")


def _done(batches) -> None:
    """Stop a loader's workers before the next measurement (they would compete for the CPU)."""
    batches.close()
    gc.collect()


def photo_training(args, make_batches, device, precision, channels_last) -> float:
    """images/s of resnet-train's `train_one_epoch` over `make_batches`' loader, after --warmup
    batches of the same pass."""
    batches, n_batches, num_classes = make_batches(args, device, channels_last)
    try:
        _check_length(args, n_batches)
        model = make_model(args.model, device, channels_last, num_classes, photo_stem(args.image_size))
        if args.compile:
            model = torch.compile(model)
        opt = sgd(model)
        step = OptimizerStep(model, opt, Scheduler(opt, cosine(10), n_batches), precision)
        train_one_epoch(step, _Take(batches, args.warmup), progress=False)
        sync(device)
        result, _ = train_one_epoch(step, _Take(batches, args.steps), progress=False)
        return result.images_per_second
    finally:
        _done(batches)


def photo_loading(args, make_batches, device, channels_last) -> float:
    """images/s of a loader alone: batches ready for the model, after --warmup batches."""
    batches, n_batches, _ = make_batches(args, device, channels_last)
    try:
        _check_length(args, n_batches)
        for _ in itertools.islice(batches, args.warmup):
            pass
        sync(device)
        start, n = time.perf_counter(), 0
        for x, _ in itertools.islice(batches, args.steps):
            n += len(x)
        sync(device)
        return n / (time.perf_counter() - start)
    finally:
        _done(batches)


def photos(args, device, precision, channels_last) -> None:
    """The --photos benchmark: rows, table and JSON."""
    size, workers, augment = args.image_size, args.num_workers, args.photo_augment
    folder = datasets.ImageFolder(Path(args.photos) / "train")
    n_files, num_classes = len(folder), len(folder.classes)
    fmt = f"{precision.name}{' + channels_last' if channels_last else ''}{' + compile' if args.compile else ''}"
    ours = f"decode + resize in {workers} workers, augment={augment} on {device.type}"
    theirs = f"ToTensor, Normalize in {workers} workers"
    tv_train = partial(torchvision_batches, transform=TV_TRAIN)
    tv_resize = partial(torchvision_batches, transform=TV_RESIZE)
    train = partial(photo_training, device=device, precision=precision, channels_last=channels_last)
    load = partial(photo_loading, device=device, channels_last=channels_last)
    rows = {  # name: (precision / format column, measurement)
        "pure step": (f"{fmt}, random {size}px batch on {device.type}",
                      partial(pure_step, args, device, precision, channels_last, size, num_classes, photo_stem(size))),
        "resnet-train, streamed": (f"{fmt}; {ours}", partial(train, args, stream_batches)),
        "torchvision ImageFolder + DataLoader": (f"{fmt}; PIL {TV_TRAIN}, {theirs}", partial(train, args, tv_train)),
        "resnet-train loader only": (f"no model; {ours}", partial(load, args, stream_batches)),
        "torchvision loader only": (f"no model; PIL {TV_TRAIN}, {theirs}", partial(load, args, tv_train)),
        f"torchvision loader only, {TV_RESIZE}": (f"no model; PIL {TV_RESIZE}, {theirs}",
                                                 partial(load, args, tv_resize)),
    }
    best = {name: 0.0 for name in rows}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every row alike
        for name, (_, measure) in rows.items():
            best[name] = max(best[name], measure())

    result = {
        "device": _describe(device), "model": args.model, "stem": photo_stem(size), "batch_size": args.batch_size,
        "precision": precision.name, "channels_last": channels_last, "compile": args.compile,
        "data": str(args.photos), "files": n_files, "classes": num_classes, "image_size": size,
        "num_workers": workers, "augment": augment, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "torch": torch.__version__, "images_per_second": best,
        "vs_pure_step": {name: rate / best["pure step"] for name, rate in best.items()},
    }
    print(f"\n{result['device']}, {args.model} ({photo_stem(size)} stem), batch {args.batch_size}, {fmt}, "
          f"{size}px, {workers} workers, {n_files:,} files in {args.photos}/train\n")
    print("| loop | precision / format | images/s | vs pure step |")
    print("|---|---|---:|---:|")
    for name, (fmt_name, _) in rows.items():
        print(f"| {name} | {fmt_name} | {best[name]:,.1f} | {best[name] / best['pure step']:.2f} |")
    training = best["resnet-train, streamed"] / best["torchvision ImageFolder + DataLoader"]
    loading = best["resnet-train loader only"] / best["torchvision loader only"]
    print(f"\nresnet-train / torchvision: training {training:.2f}x, loader only {loading:.2f}x")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(ARCHITECTURES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="auto", choices=devices.PRECISIONS)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-channels-last", action="store_true", help="resnet-train loop and pure step in NCHW")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pure step and resnet-train)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per loop")
    p.add_argument("--repeats", type=int, default=2, help="measure each loop this many times, keep the best")
    p.add_argument("--data", help="an ImageFolder root (its train/ is used); default: random images")
    p.add_argument("--skip-tutorial", action="store_true")
    p.add_argument("--augment", default="", help="also time resnet-train with these augment options, e.g. "
                   "cutout,trivialaugment,randaugment,autoaugment (rows against basic)")
    p.add_argument("--photos", metavar="FOLDER", help="instead: time streaming the photos of FOLDER/train "
                   "(ImageFolder layout) with resnet-train's loader and with torchvision's ImageFolder + DataLoader")
    p.add_argument("--image-size", type=int, default=224, help="--photos: the size the model sees")
    p.add_argument("--num-workers", type=int, default=2, help="--photos: decoding processes of both loaders")
    p.add_argument("--photo-augment", default="basic", choices=sorted(AUGMENT_OPTIONS),
                   help="--photos: resnet-train's augment option (torchvision's loader: RandomResizedCrop + flip)")
    p.add_argument("--json", default="benchmark.json", help="where to write the results")
    args = p.parse_args()

    device = devices.pick_device(args.device)
    precision = devices.Precision(devices.pick_precision(args.precision, device), device.type)
    channels_last = not args.no_channels_last
    if args.photos:
        if args.data or args.augment or args.skip_tutorial:
            p.error("--photos times its own rows: leave out --data, --augment and --skip-tutorial")
        if not (Path(args.photos) / "train").is_dir():
            p.error(f"no {Path(args.photos) / 'train'}: --photos takes an ImageFolder root, FOLDER/train/<class>/*.jpg "
                    "(scripts/make_photo_folder.py makes one)")
        return photos(args, device, precision, channels_last)
    images, labels = load_images(args)

    best = {"pure step": 0.0, "resnet-train": 0.0, "tutorial": 0.0}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every loop alike
        best["pure step"] = max(best["pure step"], pure_step(args, device, precision, channels_last))
        best["resnet-train"] = max(best["resnet-train"], ours(args, images, labels, device, precision, channels_last))
        if not args.skip_tutorial:
            best["tutorial"] = max(best["tutorial"], tutorial(args, images, labels, device))
        for name in filter(None, args.augment.split(",")):
            key = f"resnet-train, augment={name}"
            best[key] = max(best.get(key, 0.0), ours(args, images, labels, device, precision, channels_last,
                                                     AUGMENT_OPTIONS[name]))

    result = {
        "device": _describe(device), "model": args.model, "batch_size": args.batch_size, "precision": precision.name,
        "channels_last": channels_last, "compile": args.compile, "data": args.data or "random uint8 images",
        "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__,
        "images_per_second": best,
        "resnet_train_vs_pure_step": best["resnet-train"] / best["pure step"],
        "resnet_train_vs_tutorial": best["resnet-train"] / best["tutorial"] if best["tutorial"] else None,
    }
    fmt = f"{precision.name}{' + channels_last' if channels_last else ''}{' + compile' if args.compile else ''}"
    print(f"\n{result['device']}, {args.model}, batch {args.batch_size}, data: {result['data']}\n")
    print("| loop | precision / format | images/s | vs pure step |")
    print("|---|---|---:|---:|")
    policies = [k for k in best if k.startswith("resnet-train, augment=")]
    for name, fmt_name in (("pure step", fmt), ("resnet-train", fmt), ("tutorial", "fp32, NCHW, PIL + 2 workers"),
                           *((k, fmt) for k in policies)):
        if best[name]:
            print(f"| {name} | {fmt_name} | {best[name]:,.0f} | {best[name] / best['pure step']:.2f} |"
                  + (f" {best[name] / best['resnet-train']:.2f} of augment=basic |" if name in policies else ""))
    if result["resnet_train_vs_tutorial"]:
        print(f"\nresnet-train / tutorial: {result['resnet_train_vs_tutorial']:.2f}x")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
