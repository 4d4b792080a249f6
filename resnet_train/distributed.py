"""Several processes, one model: the process group, and the few collectives the loop needs.

Who each process is comes from `world.py` (torchrun's or SLURM's environment). Without several
processes every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import io
import os
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from . import world as worlds
from .world import World


DEFAULT_TIMEOUT_S = 600.0  # (the collective_timeout key's default: NCCL's own)
_timeout = timedelta(seconds=DEFAULT_TIMEOUT_S)


def init_process_group(info: World, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group once: nccl for CUDA tensors (with gloo for CPU ones), gloo without
    GPUs. A collective that waits `timeout_s` for a hung process fails (`is_peer_failure`)."""
    global _timeout
    if not info.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = worlds.master_address(dict(os.environ))
    # (RESNET_TRAIN_DIST_BACKEND=gloo: gloo for CUDA tensors too, e.g. two processes on one GPU,
    # which NCCL refuses: scripts/gpu_smoke.py)
    backend = os.environ.get("RESNET_TRAIN_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available()
                                                              else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    _timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=_restart_store(info), rank=info.rank, world_size=info.world_size,
                            timeout=_timeout)


def _restart_store(info: World) -> dist.Store | None:
    """torchrun's agent hosts one store for all the restarts of its processes (--max-restarts), and
    torch 2.14 keys the process group's entries in it alike for each: a restarted process may read
    the address of the one it replaced (gloo: "connectFullMesh failed"). A prefix per restart keeps
    them apart. (None: torch's own env:// store.)"""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=_timeout)
    return dist.PrefixStore(f"resnet-train/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of the run exited or
    stopped answering (its connection reset, or the collective timeout passed)."""
    text = str(error)
    return active() and (isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out",
                            "NCCL error", "gloo")))


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




def decided_by_main(decide: Callable[[], Any]) -> Any:
    """`decide()` as the first process answers it, on every process -- its error raised on every
    process too -- so that only the first reads run files (the others may have no shared disk)."""
    if not active():
        return decide()
    answer = b""
    if rank() == 0:
        try:
            decided: tuple[str, Any] = ("value", decide())
        except Exception as e:  # (a user error: every process says it and exits alike)
            decided = ("error", e)
        buffer = io.BytesIO()  # (torch.save: broadcast_object_list cannot pickle tensors in torch 2.14)
        torch.save(decided, buffer)
        answer = buffer.getvalue()
    kind, value = torch.load(io.BytesIO(broadcast_from_main(answer)), weights_only=False)  # (from process 0)
    if kind == "error":
        raise value
    return value


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """The first process's values of `tensors` (a model's buffers, its whole state), in place, on every process."""
    if active():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def barrier() -> None:
    if active():
        dist.barrier(group=_cpu_group())


_CPU_GROUP = None


def _cpu_group():
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=_timeout)
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
