"""The optimizers (AdamW, or Muon for the blocks' matrices with AdamW for the rest) and the learning-rate schedules
(warmup + cosine, or warmup-stable-decay)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minillama.train.config import OptimConfig
from minillama.train.muon import Muon


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW over every parameter, or (optim.name = "muon") Muon over the 2-D weights inside the blocks and AdamW
    over the token embedding (the tied head with it), an untied head and the norm gains."""
    named = list(model.named_parameters())  # a tied head appears once, as the embedding
    if config.name == "adamw":
        return _adamw([p for _, p in named], config, device)
    muon_params = [p for name, p in named if takes_muon(name, p.dim())]
    muon = Muon([{"params": muon_params, "muon": True}], lr=config.muon_lr, momentum=config.muon_momentum,
                weight_decay=config.muon_weight_decay, method=config.muon_orthogonalization,
                cautious_weight_decay=config.muon_cautious_weight_decay)
    others = [p for name, p in named if not takes_muon(name, p.dim())]
    return MuonWithAdamW(muon, _adamw(others, config, device))


def takes_muon(name: str, dims: int) -> bool:
    """Whether optim.name = "muon" gives a parameter to Muon: the 2-D weights inside the blocks, not the embedding
    (nor the tied head), an untied head or the norm gains, which AdamW keeps."""
    return name.startswith("layers.") and dims == 2


def zero_output_projections(model: nn.Module) -> None:
    """Zero each block's attention output (wo) and feed-forward output (w2) weights, so that every block starts as
    the identity on the residual stream and the model as embedding -> norm -> head (modded-nanogpt's init, from
    ReZero/Fixup's argument that deep residual stacks train faster from identity blocks). The gradients of wo and w2
    are not zero (their inputs are not), so they move at the first step."""
    with torch.no_grad():
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()


def _adamw(params: list[nn.Parameter], config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Matmul and embedding weights are decayed; norm gains (1-D) are not, since shrinking them toward zero
    would fight the normalisation rather than regularise. Each group runs at lr times its multiplier."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay, "lr_multiplier": config.embedding_lr_multiplier},
         {"params": no_decay, "weight_decay": 0.0, "lr_multiplier": config.norm_lr_multiplier}],
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        fused=True if device.type == "cuda" else None,  # one kernel for all parameters instead of a loop
    )


class MuonWithAdamW:
    """Two optimizers stepped as one: what the training loop, the fp16 gradient scaler (which reads param_groups
    and calls step) and checkpoints see."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def lr_scale(step: int, config: OptimConfig) -> float:
    """The schedule as a fraction of the peak, the same for every parameter group.

    Both schedules warm up linearly (step 0 gets 1/warmup_steps, never 0) and end at min_lr/lr from max_steps on.
    cosine decays from the end of warmup to max_steps. wsd stays at the peak until the last decay_fraction of
    max_steps and decays linearly over it; a run resumed with a larger max_steps before its decay began just stays
    at the peak longer, so it can be extended without restarting."""
    floor = config.min_lr / config.lr
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return floor
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / (config.max_steps - config.warmup_steps)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)
    decay_start = max(config.warmup_steps, config.max_steps - round(config.decay_fraction * config.max_steps))
    if step < decay_start:
        return 1.0
    return 1.0 - (step - decay_start) / (config.max_steps - decay_start) * (1.0 - floor)


def learning_rate(step: int, config: OptimConfig) -> float:
    """AdamW's learning rate at `step` (the one logged)."""
    return config.lr * lr_scale(step, config)


def muon_momentum(step: int, config: OptimConfig) -> float:
    """Muon's momentum at `step`: from muon_momentum_start up to muon_momentum over the warmup steps, constant, then
    back down to muon_momentum_start over the cooldown steps that end at max_steps (modded-nanogpt's schedule: early
    gradients are noisy, and a long average of them slows the first steps; at the end of the decay, a shorter
    average lets the last small steps follow the newest gradients)."""
    start, peak = config.muon_momentum_start, config.muon_momentum
    if step < config.muon_momentum_warmup_steps:
        return start + step / config.muon_momentum_warmup_steps * (peak - start)
    to_go = config.max_steps - step
    if to_go < config.muon_momentum_cooldown_steps:
        return start + max(0, to_go) / config.muon_momentum_cooldown_steps * (peak - start)
    return peak


def set_learning_rates(optimizer: torch.optim.Optimizer | MuonWithAdamW, step: int, config: OptimConfig) -> float:
    """Put each group at its peak (muon_lr for Muon's, lr times the group's multiplier for the others) times the
    schedule, and Muon's momentum where its warmup says; returns AdamW's base rate. A function of the step alone,
    so a resumed run continues exactly."""
    scale = lr_scale(step, config)
    for group in optimizer.param_groups:
        if group.get("muon"):
            group["lr"], group["momentum"] = config.muon_lr * scale, muon_momentum(step, config)
        else:
            group["lr"] = config.lr * group.get("lr_multiplier", 1.0) * scale
    return config.lr * scale
