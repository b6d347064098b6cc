"""What `minillama inspect` reports: parameter counts and training FLOPs per token for a model config."""

from __future__ import annotations

from typing import Any

from minillama.config import ModelConfig, to_dict


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, by arithmetic on the config (building even a memoryless model costs a second
    of imports, for numbers that are products of sizes)."""
    q_and_out = 2 * config.dim * config.n_heads * config.head_dim  # wq, wo
    keys_and_values = 2 * config.dim * config.kv_heads * config.head_dim  # wk, wv
    feed_forward = 3 * config.dim * config.ffn_hidden_dim  # w1, w2, w3
    per_block = q_and_out + keys_and_values + feed_forward + 2 * config.dim  # and two RMSNorm gains
    embedding = config.vocab_size * config.dim
    output = 0 if config.tie_embeddings else config.vocab_size * config.dim  # a tied head is the embedding itself
    blocks = per_block * config.n_layers
    return {"total": embedding + output + blocks + config.dim, "embedding": embedding, "output_head": output,
            "per_block": per_block, "blocks": blocks, "final_norm": config.dim}


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


def describe(config: ModelConfig) -> dict[str, Any]:
    return {
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
    return "\n".join(lines)
