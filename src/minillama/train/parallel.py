"""How the model is laid out over the ranks for training, applied from outside the model (which stays plain PyTorch).

- ddp: every rank holds the whole model, its gradients and optimizer state: 16 bytes per parameter with AdamW.
- fsdp (FSDP2's `fully_shard`, ZeRO-3): every rank holds 1/N of each parameter, gradient and optimizer state and
  gathers a block's weights (in bf16 when training in bf16) just before the block runs, freeing them after.
- activation checkpointing: blocks keep only their input during the forward pass and recompute the rest in the
  backward pass; about a third more compute for much less activation memory.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from minillama.model import Transformer, meta_model
from minillama.distributed import Distributed


def parallelize(model: Transformer, parallel: str, activation_checkpointing: str, compile_model: bool,
                precision: torch.dtype | None, device: torch.device, ctx: Distributed) -> tuple[nn.Module, nn.Module]:
    """Lay `model` out for training, in place; returns (compiled, step_model): what validation calls (fixed
    shapes; under fsdp a plain model that `whole_weights` points at the gathered weights) and what the
    micro-steps call. In that order because each step wraps the blocks the next one sees."""
    checkpoint_activations(model, activation_checkpointing)
    if parallel == "fsdp":
        view = gathered_view(model)
        for blocks in (model.layers, view.layers) if compile_model else ():
            for block in blocks:
                block.compile()  # per block, in place: FSDP's hooks between blocks stay outside the compiled graphs
        shard(model, precision, device)
        return view, model
    compiled = torch.compile(model) if compile_model else model
    return compiled, wrap_data_parallel(compiled, device) if ctx.enabled else compiled


def checkpoint_activations(model: Transformer, mode: str) -> None:
    """full: every block recomputes its activations in backward; selective: every other block, for about half the
    memory saving at half the recomputation (the middle ground when full checkpointing is more than needed).
    Recomputation replays the forward's RNG state, so dropout masks are the same and so are the gradients."""
    if mode == "none":
        return
    for index, block in enumerate(model.layers):
        if mode == "full" or index % 2 == 1:
            model.layers[index] = checkpoint_wrapper(block)  # its state-dict names stay those of the block


def shard(model: Transformer, precision: torch.dtype | None, device: torch.device) -> None:
    """fully_shard every block, then the root, which holds the embedding (and with it the tied head), the final
    norm and an untied head, so a tied weight is one parameter sharded once. In bf16 runs the gathered weights are
    bf16 while gradients are reduced in float32 (summing many ranks' bf16 gradients would lose precision)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # cast_forward_inputs off: blocks are called with the float32 rotary tables, which must stay float32.
    policy = MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for index, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=_reshards_after_forward(index, len(model.layers)))
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _reshards_after_forward(index: int, blocks: int) -> bool:
    """Every block frees its gathered weights after its forward, but the last, whose backward comes right after."""
    return index < blocks - 1


def wrap_data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module`, without per-forward buffer syncs: the only buffers are rotary
    tables, computed identically on every rank. Gradients live in DDP's communication buckets rather than beside
    them, which saves a float32 copy of every gradient (4 bytes per parameter)."""
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(step_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradients are averaged across ranks once per optimizer step, after its last micro-step, not after each.
    Under FSDP the earlier micro-steps accumulate unsharded float32 gradients (no reduce-scatter) until then."""
    if isinstance(step_model, FSDPModule):
        step_model.set_requires_gradient_sync(sync)
    elif isinstance(step_model, DistributedDataParallel) and not sync:
        return step_model.no_sync()
    return contextlib.nullcontext()


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most `max_norm`; the norm before clipping. Under FSDP
    each rank holds a slice of every gradient and the norm is reduced over all of them."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def gathered_view(model: Transformer) -> Transformer:
    """A plain Transformer of `model`'s shape without weights of its own (meta device); `whole_weights` points
    it at the gathered weights. It carries no FSDP hooks, so calling it never reaches a collective."""
    view = meta_model(model.config)
    view.rope_cos, view.rope_sin = model.rope_cos, model.rope_sin
    return view


@contextlib.contextmanager
def whole_weights(model: nn.Module, compiled: nn.Module) -> Iterator[tuple[Transformer, nn.Module]]:
    """(model, compiled) to evaluate and sample with, holding the whole weights inside the block.

    Under FSDP every rank gathers the whole weights and both are the plain view from `gathered_view`, pointed at
    them. Evaluation and sampling run there, never through the FSDP modules: their hooks record the order of
    forwards to choose what to gather next in backward, and rank 0 sampling alone (or ranks scoring different
    numbers of HellaSwag batches) would leave ranks with different records, so that the next step's gathers
    differ across ranks and the collectives mismatch. Unsharded models are yielded as they are."""
    if not isinstance(model, FSDPModule):
        yield model, compiled
        return
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for module in (model, *blocks):
        module.unshard()
    try:
        for name, param in model.named_parameters(remove_duplicate=False):  # a tied head names the embedding twice
            if isinstance(param, DTensor):
                raise RuntimeError(f"{name} is still sharded after unshard()")
            owner, _, attribute = name.replace(_CHECKPOINT_PREFIX, "").rpartition(".")
            setattr(compiled.get_submodule(owner), attribute, param)
        yield compiled, compiled
    finally:
        for module in (*blocks, model):
            module.reshard()
