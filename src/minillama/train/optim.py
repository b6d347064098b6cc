"""AdamW with decay on 2-D weights only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from minillama.train.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Matmul and embedding weights are decayed; norm gains (1-D) are not, since shrinking them toward zero
    would fight the normalisation rather than regularise."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        fused=True if device.type == "cuda" else None,  # one kernel for all parameters instead of a loop
    )


def learning_rate(step: int, config: OptimConfig) -> float:
    """Linear warmup to lr over warmup_steps (step 0 gets lr/warmup_steps, never 0), cosine decay to min_lr at
    max_steps, then min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / (config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)
