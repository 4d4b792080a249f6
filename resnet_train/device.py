"""Which device to train on and in which precision, its memory format and backend settings.

Every capability question goes through the small functions at the top (`cuda_available`, ...),
the one seam tests mock to pretend a GPU or a CPU without bf16.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from .config import PRECISIONS
from .errors import DeviceError


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count()


def cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def cuda_bf16_supported(index: int) -> bool:
    # Compute capability 8.0 (Ampere) and newer have native bf16 tensor cores.
    return torch.cuda.get_device_capability(index) >= (8, 0)


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def cpu_bf16_supported() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX); elsewhere bf16 on the CPU is emulated and slow."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_device(spec: str) -> torch.device:
    """`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    if spec == "auto":
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_available():
            raise DeviceError("device=mps was requested but MPS (Apple GPU) is not available here; "
                              "use device=auto or device=cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise DeviceError(f"device={spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if not cuda_available():
        raise DeviceError(f"device={spec} was requested but no CUDA GPU is available here; "
                          "use device=auto or device=cpu")
    index = int(match.group(1) or 0)
    if index >= cuda_device_count():
        count = cuda_device_count()
        raise DeviceError(f"device={spec} was requested but this machine has {count} CUDA GPU(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({cuda_name(device.index or 0)})"
    return {"mps": "mps (Apple GPU)", "cpu": "cpu"}.get(device.type, str(device))


def pick_precision(spec: str, device: torch.device) -> str:
    """Resolve `auto` to what runs fastest and safely on `device`; check explicit choices."""
    if spec not in PRECISIONS:
        raise DeviceError(f"precision={spec!r} is not one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_bf16_supported(device.index or 0) else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_bf16_supported() else "fp32"
        return "fp32"  # MPS: autocast support varies by macOS version; stay exact
    if spec == "fp16" and device.type == "cpu":
        raise DeviceError("precision=fp16 is for GPUs; on the CPU use precision=bf16 or fp32")
    return spec


@dataclass(frozen=True)
class Precision:
    """Autocast settings for one resolved precision (fp32 / bf16 / fp16)."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def pick_device_and_precision(device: str, precision: str, local_rank: int = 0) -> tuple[torch.device, Precision]:
    """The device to run on and the precision resolved *there* (a checkpoint's stored precision
    is not reused: an fp16 GPU run evaluates in fp32 or bf16 on a CPU). With several processes
    on a machine (`local_rank`), device=auto|cuda means each its own GPU."""
    chosen = pick_device(device)
    if chosen.type == "cuda" and local_rank and device in ("auto", "cuda"):
        chosen = pick_device(f"cuda:{local_rank % cuda_device_count()}")
    return chosen, Precision(pick_precision(precision, chosen), chosen.type)


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """channels_last=auto: on for CUDA and CPUs (faster convolutions), off on Apple MPS, where its
    convolutions have been slower and, in some macOS versions, wrong."""
    return device.type != "mps" if setting == "auto" else bool(setting)


def memory_format(channels_last: bool | str, device: torch.device) -> torch.memory_format:
    return torch.channels_last if use_channels_last(channels_last, device) else torch.contiguous_format


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN picks the fastest convolution algorithms for our static shapes (benchmark), unless the
    run must be repeatable on the GPU (deterministic=true), which also asks torch and cuBLAS for
    deterministic kernels. Set both ways: a later run in the same process gets its own setting."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing; never in the training loop)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
