"""Training memory per rank, and the batch arithmetic it depends on, from the config: what decides which preset
fits on which GPU with ddp or fsdp, and which micro-batch (batch.micro_batch = "auto"). The model states (weights,
gradients, optimizer) are exact (bench/memory.py checks them against the tensors DDP and FSDP really hold for AdamW, a
test against Muon's state);
activations are an estimate of what a compiled bf16 step keeps for backward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minillama.config import ModelConfig
from minillama.device import memory_bytes
from minillama.errors import MiniLlamaError
from minillama.summary import parameter_shapes
from minillama.train.config import BatchConfig, OptimConfig
from minillama.train.optim import param_groups

FLOAT32, BFLOAT16 = 4, 2  # bytes per element
OPTIMIZER_STATE = {"adamw": "AdamW moments", "muon": "Muon momentum and AdamW moments"}  # by optim.name


def shard_elements(shape: tuple[int, ...], ranks: int) -> int:
    """Elements one rank holds of a parameter FSDP shards over `ranks`: dim 0 split into equal chunks, the last
    padded, so every rank holds ceil(rows / ranks) rows."""
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def model_state_bytes(config: ModelConfig, parallel: str, ranks: int, optimizer: str = "adamw") -> dict[str, int]:
    """Bytes of float32 weights, gradients and optimizer state that one rank keeps between steps: AdamW's two
    moments per weight, or under optim.name = "muon" one momentum buffer for the blocks' matrices (Muon's) and
    AdamW's two moments for the rest."""
    shapes = parameter_shapes(config)
    held = {name: math.prod(s) if parallel == "ddp" else shard_elements(s, ranks) for name, s in shapes.items()}
    elements = sum(held.values())
    groups = param_groups({name: len(shape) for name, shape in shapes.items()}, OptimConfig(name=optimizer))
    in_muon = sum(held[name] for g in groups if g.optimizer == "muon" for name in g.names)
    return {"parameters": FLOAT32 * elements, "gradients": FLOAT32 * elements,
            "optimizer": FLOAT32 * (2 * (elements - in_muon) + in_muon)}


def step_bytes(config: ModelConfig, parallel: str, ranks: int, accumulation: int) -> int:
    """What a bf16 step holds on top of the model states: under ddp, autocast's bf16 copy of every weight; under
    fsdp, the gathered bf16 weights of the root (embedding, head) and of two blocks (the one running, the next one
    prefetched), and while micro-steps accumulate (accumulation > 1), unsharded float32 gradients of the whole model."""
    shapes = parameter_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    if parallel == "ddp":
        return BFLOAT16 * total
    root = sum(math.prod(s) for name, s in shapes.items() if not name.startswith("layers."))
    block = (total - root) // config.n_layers
    return BFLOAT16 * (root + 2 * block) + (FLOAT32 * total if accumulation > 1 else 0)


def activation_bytes_per_token(config: ModelConfig, activation_checkpointing: str) -> int:
    """Bytes kept for backward per token: in each stored block, the float32 residual stream twice, the two normed
    inputs, q, k, v and the attention output (flash attention keeps no scores), the feed-forward's three hidden
    vectors, in bf16; a checkpointed block keeps only its float32 input (and one block is recomputed at a time).
    The output head keeps bf16 logits, and its backward a float32 gradient of them: 6 bytes per vocabulary entry.
    Checked against the H200 (docs/benchmarks.md): mini-llama-109M compiled, 32 and 64 x 1024 per micro-batch,
    peaks 17.7 and 33.8 GiB (0.503 GiB per sequence); this estimate gives 17.9 and 33.9 (0.501). Eager
    PyTorch keeps about twice as much."""
    q, kv, hidden = config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.ffn_hidden_dim
    block = 2 * FLOAT32 * config.dim + BFLOAT16 * (2 * config.dim + 2 * q + 2 * kv + 3 * hidden)
    checkpointed = {"none": 0, "full": config.n_layers, "selective": config.n_layers // 2}[activation_checkpointing]
    stored = config.n_layers - checkpointed
    recomputed = block if checkpointed else 0
    head = (BFLOAT16 + FLOAT32) * config.vocab_size + BFLOAT16 * config.dim
    return stored * block + checkpointed * FLOAT32 * config.dim + recomputed + head


def training_bytes_per_rank(config: ModelConfig, parallel: str, ranks: int, micro_batch: int, seq_len: int,
                            activation_checkpointing: str = "none", accumulation: int = 2, optimizer: str = "adamw") -> dict[str, int]:
    """The estimate in parts and in total (bytes), for bf16 training with `optimizer` (optim.name)."""
    parts = model_state_bytes(config, parallel, ranks, optimizer)
    parts["step"] = step_bytes(config, parallel, ranks, accumulation)
    parts["activations"] = micro_batch * seq_len * activation_bytes_per_token(config, activation_checkpointing)
    parts["total"] = sum(parts.values())
    return parts


def check_model_fits(model: ModelConfig, parallel: str, device: torch.device, ranks: int, optimizer: str = "adamw") -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and optimizer moments alone do not
    fit in what the device holds (an allocation that large fails deep inside PyTorch, or swaps for minutes)."""
    states = sum(model_state_bytes(model, parallel, ranks, optimizer).values())
    available = memory_bytes(device)
    if available is not None and states > available:
        parameters = sum(math.prod(shape) for shape in parameter_shapes(model).values())
        raise MiniLlamaError(f"the model ({parameters:,} parameters) needs {states / 2**30:,.1f} GiB per rank for its float32 "
                             f"weights, gradients and {OPTIMIZER_STATE[optimizer]} alone, more than the {available / 2**30:,.1f} GiB of "
                             f"{device}; choose a smaller model, or shard it over more GPUs with parallel = fsdp")


# What share of the memory a device reports the estimate may fill: on a GPU its free memory (the estimate is within
# 2% of the H200's measured peaks; the rest is headroom for the allocator's fragmentation and NCCL's buffers), on a
# CPU its physical memory (shared with everything else the machine runs).
MEMORY_SHARE = {"cuda": 0.9, "cpu": 0.5}


@dataclass(frozen=True)
class MicroBatchChoice:
    """What `micro_batch = "auto"` chose, and why."""

    micro_batch: int
    accumulation: int
    estimate_bytes: int  # the estimate per rank at this micro-batch
    budget_bytes: int  # the share of the device's memory it had to fit

    def describe(self) -> str:
        return (f"batch.micro_batch auto: {self.micro_batch} ({self.accumulation} micro-steps per step; estimated "
                f"{self.estimate_bytes / 2**30:,.1f} GiB per rank of a {self.budget_bytes / 2**30:,.1f} GiB budget)")


def gradient_accumulation_steps(total_tokens: int, micro_batch: int, seq_len: int, world_size: int,
                                field: str = "batch.total_tokens") -> int:
    """Micro-steps per optimizer step; refuses a total batch (of the config's `field`) that micro-batches cannot
    make up exactly."""
    per_micro_step = micro_batch * seq_len * world_size
    if total_tokens % per_micro_step == 0:
        return total_tokens // per_micro_step
    per_rank_tokens = total_tokens // world_size if total_tokens % world_size == 0 else 0
    sequences = per_rank_tokens // seq_len if per_rank_tokens % seq_len == 0 else 0  # micro-batches that fit divide it
    fitting = sorted(b for b in (divisors(sequences) if sequences else []) if b <= 2 * micro_batch)
    nearby = max(per_micro_step, round(total_tokens / per_micro_step) * per_micro_step)
    suggestion = f"micro_batch {', '.join(map(str, fitting[-4:]))}, or " if fitting else ""
    raise MiniLlamaError(
        f"{field} {total_tokens:,} is not a multiple of micro_batch {micro_batch} x seq_len {seq_len} x "
        f"{world_size} ranks = {per_micro_step:,}; use {suggestion}{field} {nearby:,}"
    )


def full_step_accumulation(batch: BatchConfig, ranks: int) -> int:
    """Micro-steps of a step of batch.total_tokens, once every batch stage is known to be made up exactly too
    (refused before any work, not when the stage comes)."""
    for tokens in batch.step_sizes[:-1]:
        gradient_accumulation_steps(tokens, batch.micro_batch, batch.seq_len, ranks, "batch.stages")
    return gradient_accumulation_steps(batch.total_tokens, batch.micro_batch, batch.seq_len, ranks)


def micro_batch_candidates(total_tokens: int, seq_len: int, ranks: int) -> list[int]:
    """Micro-batches that make up `total_tokens` per step exactly on `ranks` ranks, largest first."""
    sequences, remainder = divmod(total_tokens, seq_len * ranks)
    if remainder or not sequences:
        raise MiniLlamaError(f"batch.total_tokens {total_tokens:,} is not a whole number of sequences of batch.seq_len {seq_len} "
                             f"on each of {ranks} ranks; choose a multiple of {seq_len * ranks:,}")
    return divisors(sequences)


def divisors(n: int) -> list[int]:
    """The divisors of `n`, largest first, found up to its square root (a billion sequences take 31,623 tries)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def fitting_micro_batch(model: ModelConfig, parallel: str, ranks: int, total_tokens: int, seq_len: int,
                        activation_checkpointing: str, budget_bytes: int, float32: bool = False,
                        optimizer: str = "adamw") -> MicroBatchChoice:
    """The largest micro-batch whose per-rank estimate fits `budget_bytes`. The activation estimate is for bf16
    autocast; `float32` training (a CPU) keeps its activations at twice the size."""
    for micro_batch in micro_batch_candidates(total_tokens, seq_len, ranks):
        accumulation = gradient_accumulation_steps(total_tokens, micro_batch, seq_len, ranks)
        parts = training_bytes_per_rank(model, parallel, ranks, micro_batch, seq_len, activation_checkpointing, accumulation,
                                        optimizer)
        estimate = parts["total"] + (parts["activations"] if float32 else 0)
        if estimate <= budget_bytes:
            return MicroBatchChoice(micro_batch, accumulation, estimate, budget_bytes)
    raise MiniLlamaError(f"even micro_batch 1 needs an estimated {estimate / 2**30:,.1f} GiB per rank, more than the "
                         f"{budget_bytes / 2**30:,.1f} GiB budget; shorten batch.seq_len, --set activation_checkpointing=full, "
                         "or shard the model with parallel = fsdp over more GPUs")


def backed_off(choice: MicroBatchChoice, try_step: Callable[[int], None], total_tokens: int, seq_len: int,
               ranks: int) -> MicroBatchChoice:
    """`choice`, or the next smaller micro-batches in turn, until one forward/backward (`try_step`) runs without
    running out of memory: what the estimate cannot see (the allocator, a compiler's workspace) is found by trying."""
    for micro_batch in [b for b in micro_batch_candidates(total_tokens, seq_len, ranks) if b <= choice.micro_batch]:
        try:
            try_step(micro_batch)
        except torch.OutOfMemoryError:
            continue
        return dataclasses.replace(choice, micro_batch=micro_batch,
                                   accumulation=gradient_accumulation_steps(total_tokens, micro_batch, seq_len, ranks))
    raise MiniLlamaError("even micro_batch 1 runs out of memory in a forward/backward pass; shorten batch.seq_len, "
                         "--set activation_checkpointing=full, or shard the model with parallel = fsdp over more GPUs")
