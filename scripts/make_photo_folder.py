#!/usr/bin/env python
"""Make a folder of photo-sized JPEGs for `scripts/benchmark.py --photos`: CIFAR-10 JPEGs upscaled.

Takes images from an ImageFolder tree of small photos (default: the shared CIFAR-10 JPEG copy,
../shared/data/cifar10-jpeg/train/<class>/*.jpg), the same number from every class, upscales each
(bicubic) to about --size with its width and height drawn apart (+-20% and +-10%), so no two
files need the same decode and resize, and writes them as JPEGs (quality 90) in the same layout,
OUT/train/<class>/<name>.jpg: real, learnable images at the size photos come in.

    python scripts/make_photo_folder.py ../photos --images 2000 --size 400x300

Upscaled 32px images are smoother than camera photos, so their files are smaller (about 12 KB at
400x300) and their entropy decoding cheaper; the decode's per-pixel work (IDCT, color conversion)
and every resize are those of a photo of that size.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train"
SUFFIXES = {".jpg", ".jpeg", ".png"}


def size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 400x300, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return width, height


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to make (its train/ must not exist yet)")
    p.add_argument("--images", type=int, default=2000, help="number of images, split evenly over the classes")
    p.add_argument("--size", type=size, default=(400, 300), help="about WIDTHxHEIGHT (default 400x300)")
    p.add_argument("--source", type=Path, default=SOURCE, help=f"an ImageFolder train split (default {SOURCE})")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    classes = sorted(d.name for d in args.source.iterdir() if d.is_dir()) if args.source.is_dir() else []
    if not classes:
        p.error(f"no class folders in {args.source}")
    if (args.out / "train").exists():
        p.error(f"{args.out / 'train'} exists already; pick another OUT or remove it")
    rng = random.Random(args.seed)
    width, height = args.size
    written = 0
    for i, name in enumerate(classes):
        count = args.images // len(classes) + (i < args.images % len(classes))
        files = sorted(f for f in (args.source / name).iterdir() if f.suffix.lower() in SUFFIXES)
        if len(files) < count:
            p.error(f"{args.source / name} has {len(files)} images, {count} wanted")
        folder = args.out / "train" / name
        folder.mkdir(parents=True)
        for f in rng.sample(files, count):
            scale, aspect = rng.uniform(0.8, 1.2), rng.uniform(0.9, 1.1)
            w, h = round(width * scale * aspect), round(height * scale / aspect)
            with Image.open(f) as im:
                im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(
                    folder / f"{f.stem}.jpg", quality=args.quality)
            written += 1
    print(f"wrote {written:,} JPEGs of about {width}x{height} (quality {args.quality}) in {len(classes)} classes "
          f"to {args.out / 'train'}")


if __name__ == "__main__":
    main()
