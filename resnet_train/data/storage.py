"""Where an image folder's decoded images live: in memory when they fit the host (every process on
the machine holds its own copy) and the device, else streamed from the files -- decided, and said,
before anything is decoded."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import DataError

GB = 1024 ** 3


@dataclass(frozen=True)
class StoragePlan:
    storage: str  # "memory" or "stream"
    line: str  # what was decided and why, for the log


def decoded_bytes(images: int, image_size: int) -> int:
    return images * image_size * image_size * 3  # uint8 RGB


def host_available_bytes() -> int:
    """Memory the host can still give (MemAvailable: free plus reclaimable caches), else its total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_budget_bytes(device: torch.device) -> int | None:
    """A third of an accelerator's memory for data (the rest is the model's); None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 3
    return None


def plan_storage(images: int, image_size: int, loader: str, device: torch.device, processes_here: int = 1,
                 num_workers: int = 0) -> StoragePlan:
    """`dataset.loader` memory, stream or auto: memory when the decoded images take at most half the
    host's available memory (times the processes on this machine) and a third of the device's."""
    size = decoded_bytes(images, image_size)
    host, device_budget = host_available_bytes(), device_budget_bytes(device)
    copies = f" x {processes_here} processes on this machine" if processes_here > 1 else ""
    facts = (f"{images:,} images at {image_size}px: {_gb(size)} decoded{copies}; the host has {_gb(host)} available"
             + (f", the device {_gb(3 * device_budget)}" if device_budget else ""))
    fits_host, fits_device = size * processes_here <= host // 2, device_budget is None or size <= device_budget
    if loader == "memory" and (size * processes_here > host or not fits_device):
        where = "the host's available memory" if size * processes_here > host else "a third of the device's memory"
        raise DataError(f"dataset.loader=memory: {facts}, more than {where}; use dataset.loader=stream "
                        "(or auto), or a smaller dataset.image_size")
    if loader == "stream" or (loader == "auto" and not (fits_host and fits_device)):
        why = "" if loader == "stream" else ", too much to hold (dataset.loader=auto)"
        return StoragePlan("stream", f"{facts}{why}: streamed from the files by "
                                     f"{num_workers or 'no'} decoding worker{'s' * (num_workers != 1)}")
    return StoragePlan("memory", f"{facts}: decoded once into memory")


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1024 ** 2:.0f} MB"
