"""The one module that calls ``torch.distributed`` collectives.

NCCL moves only CUDA tensors that live on the rank's own device; gloo moves host
tensors. Every collective of dude_dist goes through the functions below, which move a
tensor to :func:`comm_device` (``cuda:<this rank's device>`` for NCCL, CPU otherwise),
run the collective there and copy the result back into the caller's tensor, wherever it
lives. With one process (no process group, or world size 1) every function is a no-op
that returns the local values. Counting bytes (for the init's figures) is the caller's.

The vocabulary follows torchtitan's ``dist_sum``/``dist_max``: :func:`all_reduce` for
tensors, :func:`sum_floats`/:func:`max_floats` for a few host numbers (one collective
for the whole list).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_active() -> bool:
    """Whether there is a process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device_for_backend(backend: str, local_rank: int, device_count: int) -> torch.device:
    """The device a backend's collectives run on: ``cuda:<local_rank % device_count>`` for
    NCCL (a site that binds one GPU per task shows each rank ``device_count == 1``), CPU
    for gloo and MPI.

    Raises:
        RuntimeError: NCCL without a visible CUDA device.
    """
    if backend.lower() != "nccl":
        return torch.device("cpu")
    if device_count < 1:
        raise RuntimeError("backend nccl needs a CUDA device, but none is visible (CUDA_VISIBLE_DEVICES?)")
    return torch.device("cuda", local_rank % device_count)


def comm_device() -> torch.device:
    """The device this process's collectives run on (CPU when there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend())
    if backend.lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run_on_device(tensor: torch.Tensor, fn) -> None:
    """Run ``fn`` (an in-place collective) on a copy of ``tensor`` on the comm device when
    ``tensor`` lives elsewhere, then copy the result back."""
    device = comm_device()
    if tensor.device == device:
        fn(tensor)
        return
    moved = tensor.to(device)
    fn(moved)
    tensor.copy_(moved)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group`` (``op``: sum, max, min); returns it."""
    if is_active():
        _run_on_device(tensor, lambda t: dist.all_reduce(t, op=_OPS[op], group=group))
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast of ``tensor`` from global rank ``src``; returns it."""
    if is_active():
        _run_on_device(tensor, lambda t: dist.broadcast(t, src=src, group=group))
    return tensor


def gather(tensor: torch.Tensor, dst: int, group=None) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape everywhere) on global rank ``dst``, in group rank
    order, on the comm device; None on the other ranks. Only ``dst`` allocates the result."""
    if not is_active():
        return [tensor]
    device = comm_device()
    local = tensor.to(device)
    me = dist.get_rank()
    size = dist.get_world_size(group=group)
    out = [torch.empty_like(local) for _ in range(size)] if me == dst else None
    dist.gather(local, out, dst=dst, group=group)
    return out


def _floats(values: list[float], op: str) -> list[float]:
    local = torch.tensor(values, dtype=torch.float64)
    return all_reduce(local, op).tolist()


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few host numbers (one collective)."""
    return _floats(values, "sum")


def max_floats(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks of a few host numbers (one collective)."""
    return _floats(values, "max")


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list of host numbers (the same length on every rank), in rank order."""
    local = torch.tensor(values, dtype=torch.float64)
    if not is_active():
        return [local.tolist()]
    moved = local.to(comm_device())
    out = [torch.empty_like(moved) for _ in range(world_size())]
    dist.all_gather(out, moved)
    return [t.tolist() for t in out]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (small values: host names, dicts of floats)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_active():
        dist.barrier()


def destroy() -> None:
    """Tear the process group down (every entry point does, on any exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Comm:
    """The collectives of the sharded initialiser, counting the bytes they move.

    Attributes:
        rank, world_size: of the default process group (0 and 1 with one process).
        bytes_broadcast: bytes sent out by broadcasts (counted once per broadcast).
        bytes_gathered: bytes received by this rank as a gather's owner.
    """

    def __init__(self) -> None:
        self.active = is_active()
        self.rank = rank() if self.active else 0
        self.world_size = world_size() if self.active else 1
        self.bytes_broadcast = 0
        self.bytes_gathered = 0

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        if self.active:
            broadcast(tensor, src)
            self.bytes_broadcast += tensor.numel() * tensor.element_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        all_reduce(tensor, "sum")

    def gather(self, tensor: torch.Tensor, dst: int, group=None) -> list[torch.Tensor] | None:
        out = gather(tensor, dst, group)
        if self.active and self.rank == dst:
            self.bytes_gathered += tensor.numel() * tensor.element_size() * (len(out) - 1)
        return out

    def all_gather_floats(self, values: list[float]) -> list[list[float]]:
        return all_gather_floats(values)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return all_gather_object(obj)

    def barrier(self) -> None:
        barrier()
