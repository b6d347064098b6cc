"""Training memory per rank, by arithmetic on the config: what decides which preset fits on which GPU with ddp or
fsdp. The model states (weights, gradients, optimizer) are exact for AdamW (bench/memory.py checks them against
the tensors DDP and FSDP really hold); activations are an estimate of what a compiled bf16 step keeps for backward.
"""

from __future__ import annotations

import math

import torch

from minillama.config import ModelConfig
from minillama.device import memory_bytes
from minillama.errors import MiniLlamaError
from minillama.summary import parameter_shapes

FLOAT32, BFLOAT16 = 4, 2  # bytes per element


def shard_elements(shape: tuple[int, ...], ranks: int) -> int:
    """Elements one rank holds of a parameter FSDP shards over `ranks`: dim 0 split into equal chunks, the last
    padded, so every rank holds ceil(rows / ranks) rows."""
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def model_state_bytes(config: ModelConfig, parallel: str, ranks: int) -> dict[str, int]:
    """Bytes of float32 weights, gradients and AdamW's two moments that one rank keeps between steps."""
    shapes = parameter_shapes(config).values()
    elements = sum(math.prod(s) for s in shapes) if parallel == "ddp" else sum(shard_elements(s, ranks) for s in shapes)
    return {"parameters": FLOAT32 * elements, "gradients": FLOAT32 * elements, "optimizer": 2 * FLOAT32 * elements}


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
                            activation_checkpointing: str = "none", accumulation: int = 2) -> dict[str, int]:
    """The estimate in parts and in total (bytes), for AdamW and bf16 training."""
    parts = model_state_bytes(config, parallel, ranks)
    parts["step"] = step_bytes(config, parallel, ranks, accumulation)
    parts["activations"] = micro_batch * seq_len * activation_bytes_per_token(config, activation_checkpointing)
    parts["total"] = sum(parts.values())
    return parts


def check_model_fits(model: ModelConfig, parallel: str, device: torch.device, ranks: int) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and optimizer moments alone do not
    fit in what the device holds (an allocation that large fails deep inside PyTorch, or swaps for minutes)."""
    states = sum(model_state_bytes(model, parallel, ranks).values())
    available = memory_bytes(device)
    if available is not None and states > available:
        parameters = sum(math.prod(shape) for shape in parameter_shapes(model).values())
        raise MiniLlamaError(f"the model ({parameters:,} parameters) needs {states / 2**30:,.1f} GiB per rank for its float32 "
                             f"weights, gradients and AdamW moments alone, more than the {available / 2**30:,.1f} GiB of "
                             f"{device}; choose a smaller model, or shard it over more GPUs with parallel = fsdp")
