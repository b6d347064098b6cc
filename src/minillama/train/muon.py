"""Muon: Nesterov momentum, then the update replaced by its nearest (semi-)orthogonal matrix, approximated by a
few matrix polynomials.

torch.optim.Muon does this with one coefficient triple for every iteration and always in bfloat16. This one adds
what the speedrun recipe needs: Polar Express's per-iteration coefficients, cautious weight decay, and float32 off
CUDA (bfloat16 matmuls are 15-40x slower than float32 on a CPU). With the quintic Newton-Schulz in bfloat16 it
takes exactly torch.optim.Muon's steps, and it keeps its state (`momentum_buffer`) under the same name, so
checkpoints of either resume with the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

# Keller Jordan's quintic: the same triple at every iteration, chosen for the steepest slope at zero; it leaves the
# singular values spread around 1 (about 0.7 to 1.2) rather than converging.
NEWTON_SCHULZ = ((3.4445, -4.7750, 2.0315),) * 5
# Polar Express (Amsel, Persson, Musco and Gower, 2025, arXiv:2505.16932): a different optimal quintic for each of
# five iterations, so the singular values end closer to 1 in the same number of matmuls. These are the published
# coefficients with the paper's safety margin, as modded-nanogpt uses them; the input is scaled by 1/(1.02 |G|_F)
# to leave room for rounding.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ITERATIONS = {"newton_schulz": (NEWTON_SCHULZ, 1.0), "polar_express": (POLAR_EXPRESS, 1.02)}
Orthogonalization = Literal["newton_schulz", "polar_express"]


def orthogonalized(matrix: Tensor, method: Orthogonalization, dtype: torch.dtype, eps: float = 1e-7) -> Tensor:
    """An approximation of U V^T for matrix = U S V^T, computed in `dtype` on the wide orientation (the Gram
    matrix is then the smaller of the two)."""
    coefficients, margin = ITERATIONS[method]
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() * margin).clamp(min=eps)  # every singular value now at most 1
    for a, b, c in coefficients:
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights. Each group's lr, momentum and weight_decay may change between steps (the schedule
    sets them); the method, cautious decay and dtype are fixed for the optimizer's life.

    cautious_weight_decay decays only the entries that the update is already moving toward zero (update and weight
    of the same sign), so decay never fights the gradient (Chen et al., 2025, "Cautious Weight Decay",
    arXiv:2510.12402). dtype None: bfloat16 on CUDA, float32 elsewhere."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float, weight_decay: float = 0.0,
                 method: Orthogonalization = "newton_schulz", cautious_weight_decay: bool = False, dtype: torch.dtype | None = None):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.method, self.cautious_weight_decay, self.dtype = method, cautious_weight_decay, dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                nesterov = param.grad.lerp(buffer, momentum)
                dtype = self.dtype or (torch.bfloat16 if param.device.type == "cuda" else torch.float32)
                update = orthogonalized(nesterov, self.method, dtype)
                if self.cautious_weight_decay:
                    param.sub_(param * (update * param > 0), alpha=lr * weight_decay)
                else:
                    param.mul_(1 - lr * weight_decay)
                rows, cols = param.shape
                param.add_(update, alpha=-lr * math.sqrt(max(1.0, rows / cols)))  # the same RMS for tall matrices
