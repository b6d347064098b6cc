"""A model config by arithmetic: every parameter's shape, parameter counts and training FLOPs per token (what
`minillama inspect` reports, and what the memory estimate and MFU are computed from)."""

from __future__ import annotations

import math
from typing import Any

from minillama.config import ModelConfig, to_dict


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name, as the model registers them (a tied head is the embedding: listed once)."""
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, config.dim)}
    for layer in range(config.n_layers):
        block = {"attention_norm.weight": (config.dim,), "attention.wq.weight": (q, config.dim),
                 "attention.wk.weight": (kv, config.dim), "attention.wv.weight": (kv, config.dim),
                 "attention.wo.weight": (config.dim, q), "ffn_norm.weight": (config.dim,),
                 "feed_forward.w1.weight": (config.ffn_hidden_dim, config.dim),
                 "feed_forward.w2.weight": (config.dim, config.ffn_hidden_dim),
                 "feed_forward.w3.weight": (config.ffn_hidden_dim, config.dim)}
        shapes.update({f"layers.{layer}.{name}": shape for name, shape in block.items()})
    shapes["norm.weight"] = (config.dim,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, config.dim)
    return shapes


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, from `parameter_shapes` (building even a memoryless model costs a second of
    imports, for numbers that are products of sizes)."""
    sizes = {name: math.prod(shape) for name, shape in parameter_shapes(config).items()}
    blocks = sum(size for name, size in sizes.items() if name.startswith("layers."))
    embedding, output = sizes["tok_embeddings.weight"], sizes.get("output.weight", 0)  # a tied head is the embedding itself
    return {"total": sum(sizes.values()), "embedding": embedding, "output_head": output,
            "per_block": blocks // config.n_layers, "blocks": blocks, "final_norm": sizes["norm.weight"]}


def training_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """6 FLOPs per matmul weight per token (forward 2, backward 4), plus attention scores and values:
    6 * 2 * n_layers * dim * seq_len (PaLM's accounting, no discount for the causal mask).

    The matmul weights are every parameter but the input embedding lookup; a tied head still does its matmul,
    so its weights count once.
    """
    counts = count_parameters(config)
    matmul_params = counts["total"] - (0 if config.tie_embeddings else counts["embedding"])
    seq_len = seq_len or config.max_seq_len
    return 6 * matmul_params + 12 * config.n_layers * config.dim * seq_len


def describe(config: ModelConfig, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model's config, derived sizes, parameter counts and FLOPs, and for a checkpoint how it was trained."""
    return {
        **({"training": training} if training else {}),
        "config": to_dict(config),
        "derived": {"head_dim": config.head_dim, "kv_heads": config.kv_heads, "ffn_hidden_dim": config.ffn_hidden_dim},
        "parameters": count_parameters(config),
        "training_flops_per_token": training_flops_per_token(config),
    }


def format_description(description: dict[str, Any]) -> str:
    params = description["parameters"]
    lines = ["model config:"]
    lines += [f"  {key:<20} {value}" for key, value in description["config"].items()]
    lines += [f"  {key:<20} {value}  (derived)" for key, value in description["derived"].items()]
    lines += [
        "parameters:",
        f"  total                {params['total']:,}",
        f"  token embedding      {params['embedding']:,}" + ("  (shared with the output head)" if not params["output_head"] else ""),
    ]
    if params["output_head"]:
        lines.append(f"  output head          {params['output_head']:,}")
    lines += [
        f"  per block            {params['per_block']:,}",
        f"  all blocks           {params['blocks']:,}",
        f"  final norm           {params['final_norm']:,}",
        f"training FLOPs/token   {description['training_flops_per_token']:,}  (at max_seq_len)",
    ]
    return "\n".join(_training_lines(description.get("training") or {}) + lines)


def _training_lines(training: dict[str, Any]) -> list[str]:
    if not training:
        return []
    lines = ["checkpoint:"]
    if "step" in training:
        lines.append(f"  steps done           {training['step']:,}" + (f"  ({training['tokens_seen']:,} tokens seen)"
                                                                         if "tokens_seen" in training else ""))
    if "last_val_loss" in training:
        lines.append(f"  last val loss        {training['last_val_loss']['val_loss']:.4f}  (at step {training['last_val_loss']['step']:,})")
    recipe = training.get("recipe")
    if recipe:
        lines.append("  recipe               " + ", ".join(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
                                                          for key, value in recipe.items() if value is not None))
    return lines
