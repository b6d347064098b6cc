"""The optimizers (AdamW, or Muon for the blocks' matrices with AdamW for the rest) and the learning-rate schedules
(warmup + cosine, or warmup-stable-decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minillama.train.config import OptimConfig
from minillama.train.muon import Muon


@dataclass(frozen=True)
class ParamGroup:
    """One kind of parameter and how the recipe trains it. `param_groups` describes a run's groups once; the
    optimizer, the memory estimate and the tests read that description, so an option reaches exactly the
    parameters its group lists."""

    kind: str  # "embedding" (with an untied head), "matrices" (the blocks' 2-D weights) or "norms"
    optimizer: str  # "adamw" or "muon"
    names: tuple[str, ...]
    lr_multiplier: float  # times the optimizer's peak rate (optim.lr, or optim.muon_lr for Muon)
    weight_decay: float


def param_groups(dims: dict[str, int], config: OptimConfig) -> list[ParamGroup]:
    """The recipe's groups over parameters named as in `dims` ({name: number of dimensions}; a tied head appears
    once, as the embedding). Each parameter is in exactly one group.

    - embedding: the token embedding and an untied head, AdamW at lr x embedding_lr_multiplier, decayed;
    - matrices: the 2-D weights inside the blocks, Muon at muon_lr (optim.name = "muon") or AdamW at lr, decayed;
    - norms: the 1-D gains, AdamW at lr x norm_lr_multiplier, not decayed (shrinking a gain toward zero would fight
      the normalisation rather than regularise)."""
    embedding = tuple(n for n in dims if n in EMBEDDING_NAMES)
    matrices = tuple(n for n in dims if takes_muon(n, dims[n]))
    norms = tuple(n for n in dims if dims[n] < 2)
    muon = config.name == "muon"
    groups = [
        ParamGroup("embedding", "adamw", embedding, config.embedding_lr_multiplier, config.weight_decay),
        ParamGroup("matrices", "muon" if muon else "adamw", matrices, 1.0, config.muon_weight_decay if muon else config.weight_decay),
        ParamGroup("norms", "adamw", norms, config.norm_lr_multiplier, 0.0),
    ]
    grouped = [n for g in groups for n in g.names]
    if sorted(grouped) != sorted(dims):  # a parameter kind the recipe does not know, or one in two groups: a bug
        raise ValueError(f"parameter groups cover {sorted(grouped)}, the model has {sorted(dims)}")
    return groups


EMBEDDING_NAMES = ("tok_embeddings.weight", "output.weight")


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.Optimizer | MuonWithAdamW:
    """The optimizer `param_groups` describes: AdamW over its groups, or (optim.name = "muon") Muon over the
    blocks' matrices with AdamW over the rest."""
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    groups = param_groups({name: p.dim() for name, p in params.items()}, config)
    adamw = _adamw([g for g in groups if g.optimizer == "adamw"], params, config, device)
    muon_groups = [g for g in groups if g.optimizer == "muon"]
    if not muon_groups:
        return adamw
    muon = Muon([{"params": [params[n] for n in g.names], "muon": True, "lr_multiplier": g.lr_multiplier,
                  "weight_decay": g.weight_decay, "kind": g.kind} for g in muon_groups],
                lr=config.muon_lr, momentum=config.muon_momentum, weight_decay=config.muon_weight_decay,
                method=config.muon_orthogonalization, cautious_weight_decay=config.muon_cautious_weight_decay)
    return MuonWithAdamW(muon, adamw)


def takes_muon(name: str, dims: int) -> bool:
    """Whether a parameter is one of the blocks' matrices, the group optim.name = "muon" gives to Muon (not the
    embedding, the tied or untied head, nor the norm gains, which AdamW keeps)."""
    return name.startswith("layers.") and dims == 2


def load_optimizer_state(optimizer: torch.optim.Optimizer | MuonWithAdamW, state: dict[str, Any], model: nn.Module) -> None:
    """Load a saved optimizer state. An AdamW run saved before the groups were described by kind held two groups
    (every 2-D weight, then the 1-D gains); its per-parameter state is moved to the same parameters in today's
    groups, so such a run resumes exactly."""
    if isinstance(optimizer, torch.optim.AdamW) and len(state["param_groups"]) == 2 != len(optimizer.param_groups):
        named = list(model.named_parameters())
        before = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
        index = {id(p): i for i, (_, p) in enumerate(named)}
        now = [named[index[id(p)]][0] for g in optimizer.param_groups for p in g["params"]]
        at = {name: i for i, name in enumerate(before)}
        state = {"state": {i: state["state"][at[name]] for i, name in enumerate(now) if at[name] in state["state"]},
                 "param_groups": optimizer.state_dict()["param_groups"]}  # today's groups, numbered in the same order
    optimizer.load_state_dict(state)


def zero_output_projections(model: nn.Module) -> None:
    """Zero each block's attention output (wo) and feed-forward output (w2) weights, so that every block starts as
    the identity on the residual stream and the model as embedding -> norm -> head (modded-nanogpt's init, from
    ReZero/Fixup's argument that deep residual stacks train faster from identity blocks). The gradients of wo and w2
    are not zero (their inputs are not), so they move at the first step."""
    with torch.no_grad():
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()


def _adamw(groups: list[ParamGroup], params: dict[str, nn.Parameter], config: OptimConfig,
           device: torch.device) -> torch.optim.AdamW:
    """AdamW over `groups`, each at lr times its multiplier with its own weight decay."""
    return torch.optim.AdamW(
        [{"params": [params[n] for n in g.names], "weight_decay": g.weight_decay, "lr_multiplier": g.lr_multiplier,
          "kind": g.kind} for g in groups],
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
            group["lr"] = config.muon_lr * group.get("lr_multiplier", 1.0) * scale
            group["momentum"] = muon_momentum(step, config)
        else:
            group["lr"] = config.lr * group.get("lr_multiplier", 1.0) * scale
    return config.lr * scale
