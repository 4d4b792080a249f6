"""Several processes, one model: the process group, and the few collectives the loop needs.

Who each process is comes from `world.py` (torchrun's or SLURM's environment). Without several
processes every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from . import world as worlds
from .world import World


def init_process_group(info: World) -> None:
    """Join the process group once: nccl for CUDA tensors (with gloo for CPU ones), gloo without GPUs."""
    if not info.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = worlds.slurm_master(dict(os.environ))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)


def shutdown() -> None:
    """Leave the process group (at the end of a run), so the process exits without a warning."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def gather_objects(value: Any) -> list[Any]:
    """Every process's `value`, in rank order, on every process (small Python objects)."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_cpu_group())
    return out


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """The first process of each machine runs the block first (a download, say) and the others
    after it, so they read its finished files instead of writing the same ones at once."""
    first = worlds.from_environment().local_rank == 0
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place, across processes (nothing when single)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank (small Python objects, over a CPU group)."""
    if not active():
        return value
    objects = [value]
    dist.broadcast_object_list(objects, src=0, group=_cpu_group())
    return objects[0]


def without_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """`model` without its DistributedDataParallel wrapper (compiled again where it was compiled),
    for evaluation: DDP's forward joins a broadcast that every process must join, once per batch,
    and a process may have fewer validation batches than another (none, with fewer images than processes)."""
    compiled = isinstance(getattr(model, "_orig_mod", None), torch.nn.Module)
    inner = model._orig_mod if compiled else model
    if not isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return model
    return torch.compile(inner.module) if compiled else inner.module


def broadcast_buffers(model: torch.nn.Module) -> None:
    """The first process's buffers (BatchNorm statistics) on every process, as DDP's next forward
    would make them: each process's last training forward updated its own."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    if active():
        dist.barrier(group=_cpu_group())


_CPU_GROUP = None


def _cpu_group():
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def agreed_stop(requested: Callable[[], bool], every: int) -> Callable[[], bool]:
    """A stop check every process answers alike: every `every` calls the ranks share their flags
    (so a signal seen by one rank stops all at the same step, without a sync per step)."""
    if not active():
        return requested
    calls, decided = 0, False

    def should_stop() -> bool:
        nonlocal calls, decided
        calls += 1
        if not decided and calls % every == 0:
            flag = torch.tensor([1.0 if requested() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group())
            decided = bool(flag.item())
        return decided
    return should_stop
