"""Data-parallel set-up from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE): NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str, alone_as_group: bool = False) -> Distributed:
    """One process per device under torchrun; a plain single process otherwise, in a process group of its own
    when `alone_as_group` (FSDP and its sharded checkpoints need a group even of one)."""
    if "RANK" not in os.environ and not alone_as_group:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # Without torchrun there is no rendezvous to make: an in-memory store serves the one process.
    alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        # device_id binds the process group to this rank's GPU up front (and silences NCCL's guess at it).
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank), **alone)
    else:
        dist.init_process_group(backend="gloo", **alone)
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size())


def close_distributed(ctx: Distributed) -> None:
    if dist.is_initialized():  # also under torchrun with one process
        dist.destroy_process_group()


def barrier(ctx: Distributed) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor)  # SUM: gloo has no AVG
        tensor /= ctx.world_size
    return tensor


def any_rank(flag: bool, ctx: Distributed, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (all ranks must call this; `device`: NCCL reduces on the GPU)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def smallest_over_ranks(value: int, ctx: Distributed, device: torch.device) -> int:
    """The smallest of every rank's `value`, on every rank (all ranks must call this)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj`, on every rank (all ranks must call this)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object, ctx: Distributed) -> list[object]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
