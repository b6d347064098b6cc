"""Data-parallel set-up from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE): NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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


def init_distributed(device_name: str) -> Distributed:
    """One process per device under torchrun; a plain single process otherwise."""
    if "RANK" not in os.environ:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        # device_id binds the process group to this rank's GPU up front (and silences NCCL's guess at it).
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend="gloo")
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size())


def close_distributed(ctx: Distributed) -> None:
    if dist.is_initialized():  # also under torchrun with one process
        dist.destroy_process_group()


def wrap_data_parallel(module: torch.nn.Module, device: torch.device, ctx: Distributed) -> torch.nn.Module:
    """DistributedDataParallel around `module`, without per-forward buffer syncs: the only buffers are rotary
    tables, computed identically on every rank."""
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


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


def gather_objects(obj: object, ctx: Distributed) -> list[object]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
