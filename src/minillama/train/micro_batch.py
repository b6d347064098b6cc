"""batch.micro_batch = "auto": the largest micro-batch that fits the device, chosen from the per-rank memory estimate
and, on a GPU, confirmed by one forward/backward pass that backs off while it runs out of memory. Gradient
accumulation makes up batch.total_tokens exactly, so the recipe is unchanged."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from minillama.device import autocast, memory_bytes
from minillama.distributed import Distributed, smallest_over_ranks
from minillama.errors import MiniLlamaError
from minillama.train.config import TrainConfig
from minillama.train.memory import MEMORY_SHARE, MicroBatchChoice, backed_off, fitting_micro_batch, gradient_accumulation_steps
from minillama.train.parallel import gradient_sync


def with_micro_batch(config: TrainConfig, micro_batch: int) -> TrainConfig:
    return dataclasses.replace(config, batch=dataclasses.replace(config.batch, micro_batch=micro_batch))


def estimated_micro_batch(config: TrainConfig, device: torch.device, precision: torch.dtype | None,
                          ctx: Distributed) -> MicroBatchChoice:
    """The largest micro-batch whose estimate fits MEMORY_SHARE of what the device holds, the same on every rank."""
    return _agreed(estimate_for_ranks(config, device, precision, ctx.world_size), config, ctx, device)


def estimate_for_ranks(config: TrainConfig, device: torch.device, precision: torch.dtype | None,
                       ranks: int) -> MicroBatchChoice:
    """This device's choice when the run has `ranks` ranks, from the estimate alone (what `--dry-run` can know
    without starting them): each rank takes its share of every step, so more ranks leave fewer sequences per rank."""
    available = memory_bytes(device)
    if available is None:
        raise MiniLlamaError(f"batch.micro_batch = \"auto\" needs to know how much memory {device} has, and it cannot be told "
                             "here; set a number, e.g. --set batch.micro_batch=16")
    budget = int(available * MEMORY_SHARE.get(device.type, MEMORY_SHARE["cuda"]))
    choice = fitting_micro_batch(config.model, config.parallel, ranks, _every_step(config), config.batch.seq_len,
                                 config.activation_checkpointing, budget, float32=precision is None, optimizer=config.optim.name)
    return _with_full_step_accumulation(choice, config, ranks)


def tried_micro_batch(choice: MicroBatchChoice, config: TrainConfig, step_model: torch.nn.Module, device: torch.device,
                      precision: torch.dtype | None, ctx: Distributed) -> MicroBatchChoice:
    """`choice` confirmed by a forward/backward pass on random tokens, backing off to smaller micro-batches on an
    out-of-memory error. Only where a pass involves no other rank: a CUDA device under ddp (gradients unsynced)
    or alone; under fsdp every pass gathers weights from all ranks, so the estimate alone decides."""
    if device.type != "cuda" or config.parallel == "fsdp":
        return choice
    tried = backed_off(choice, _forward_backward(step_model, config, device, precision), _every_step(config),
                       config.batch.seq_len, ctx.world_size)
    return _agreed(tried, config, ctx, device)


def _every_step(config: TrainConfig) -> int:
    """The largest batch every step's is a multiple of: a micro-batch that makes it up exactly makes up each stage."""
    return math.gcd(*config.batch.step_sizes)


def _forward_backward(step_model: torch.nn.Module, config: TrainConfig, device: torch.device,
                      precision: torch.dtype | None) -> Callable[[int], None]:
    def run(micro_batch: int) -> None:
        generator = torch.Generator(device).manual_seed(0)
        tokens = torch.randint(config.model.vocab_size, (micro_batch, config.batch.seq_len + 1), device=device, generator=generator)
        try:
            with torch.random.fork_rng(devices=[device]), gradient_sync(step_model, sync=False), autocast(device, precision):
                _, loss = step_model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
        finally:
            step_model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return run


def _agreed(choice: MicroBatchChoice, config: TrainConfig, ctx: Distributed, device: torch.device) -> MicroBatchChoice:
    """The smallest of the ranks' choices on every rank: all of them step on the same batch shapes."""
    micro_batch = smallest_over_ranks(choice.micro_batch, ctx, device)
    return _with_full_step_accumulation(dataclasses.replace(choice, micro_batch=micro_batch), config, ctx.world_size)


def _with_full_step_accumulation(choice: MicroBatchChoice, config: TrainConfig, ranks: int) -> MicroBatchChoice:
    """`choice` with the micro-steps of a step of batch.total_tokens (it was fitted to the smallest stage's)."""
    accumulation = gradient_accumulation_steps(config.batch.total_tokens, choice.micro_batch, config.batch.seq_len, ranks)
    return dataclasses.replace(choice, accumulation=accumulation)
