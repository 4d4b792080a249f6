#!/usr/bin/env python
"""No host-device synchronization inside resnet-train's training step, on a CUDA GPU.

Runs the loop's per-batch work -- the data path's crop/flip/policies/cutout/erasing on the device,
MixUp/CutMix, forward, backward, gradient clipping, the optimizer step and the EMA update -- for
each augment option under `torch.cuda.set_sync_debug_mode("error")`, which raises at the first
operation that makes the host wait for the GPU (`.item()`, a tensor built from Python data on
the device, `nonzero`, ...). Logging and checkpoints, which read the device on purpose every N
steps, are not part of a step.

    python scripts/sync_check.py             (gpu_smoke.sh runs it; without a CUDA GPU it exits 0)
"""

from __future__ import annotations

import sys

import torch

from resnet_train.build import training_step
from resnet_train.composing import compose_train
from resnet_train.data import Augment, BatchTransform, MemoryLoader
from resnet_train.device import Precision
from resnet_train.models import resnet20

OPTIONS = {
    "crop + flip": Augment(),
    "resized_crop": Augment(crop="resized"),
    "trivialaugment": Augment(policy="trivialaugment"),
    "randaugment": Augment(policy="randaugment"),
    "autoaugment": Augment(policy="autoaugment"),
    "color jitter + cutout + erasing": Augment(color_jitter=0.4, cutout=8, erasing=0.25),
}


# The step as a run builds it (build.training_step: on CUDA the fused optimizer), with every option on.
RUN = ["model=resnet20", "optim.lr=0.05", "label_smoothing=0.1", "grad_clip_norm=1.0", "mix.mixup_alpha=0.2",
       "mix.cutmix_alpha=1.0", "ema.decay=0.99", "epochs=2"]


def steps_without_sync(augment: Augment, precision: Precision, device: torch.device, steps: int = 4) -> None:
    model = resnet20().to(device, memory_format=torch.channels_last)
    step = training_step(compose_train(RUN), model, precision, steps + 1, device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, ((steps + 1) * 64, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, ((steps + 1) * 64,), generator=g).to(device)
    transform = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment, channels_last=True)
    loader = MemoryLoader(images, labels, 64, transform, train=True)
    for epoch, check in enumerate((False, True)):  # a first pass fills the caches (op tables, mean/std)
        loader.set_epoch(epoch)
        step.settings.mixer.set_epoch(epoch)
        torch.cuda.set_sync_debug_mode("error" if check else "default")
        try:
            batches = iter(loader)
            for _ in range(len(loader)):
                step(batches)  # (the one optimizer step training makes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def main() -> int:
    if not torch.cuda.is_available():
        print("sync_check: no CUDA GPU here; nothing to check")
        return 0
    device = torch.device("cuda")
    failed = 0
    for precision in (Precision("bf16", "cuda"), Precision("fp16", "cuda")):
        for name, augment in OPTIONS.items():
            try:
                steps_without_sync(augment, precision, device)
                print(f"| {name} | {precision.name} | no sync |")
            except RuntimeError as e:  # set_sync_debug_mode("error") raises RuntimeError at the sync
                failed += 1
                print(f"| {name} | {precision.name} | SYNC: {str(e).splitlines()[0]} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
