"""Choosing each row's next token its own way, for a whole batch at once.

Every row draws its token by inverse transform sampling from one uniform number, drawn from the row's own
random stream (a CPU generator seeded with the row's seed): a row's tokens depend on its seed and its logits
only, not on which other requests share the batch, nor on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from minillama.errors import ArgumentError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def nth_seed(seed: int | None, n: int) -> int | None:
    """The seed of the n-th of several completions that share `seed`: seed + n, wrapping around past MAX_SEED, so
    every seed the API accepts works with any number of completions."""
    return None if seed is None else (seed + n) % (MAX_SEED + 1)


@dataclass(frozen=True)
class SamplingParams:
    """How one row chooses its tokens. Any positive temperature works: a tiny one is greedy, never NaN."""

    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens; 0 or None: no cut
    top_p: float | None = None  # keep the smallest set reaching this mass (after top_k); None or 1: no cut
    seed: int | None = None  # None: a fresh random stream

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ArgumentError("{temperature} is {value}; expected 0 (greedy) or a positive number", value=self.temperature)
        if self.top_k is not None and self.top_k < 0:
            raise ArgumentError("{top_k} is {value}; expected a positive integer, or 0 (or none) for no top-k cut", value=self.top_k)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ArgumentError("{top_p} is {value}; expected a number in (0, 1]", value=self.top_p)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ArgumentError("{seed} is {value}; expected an integer from 0 to {limit:,}", value=self.seed, limit=MAX_SEED)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def random_stream(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def choose_tokens(logits: Tensor, params: list[SamplingParams], uniforms: Tensor) -> Tensor:
    """One token id per row of `logits` (B, vocab): greedy rows take the argmax, the others sample after top-k
    and top-p with their own `uniforms` (B,) in [0, 1)."""
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)[:, None]
    # Shift by the row's maximum before dividing: the same softmax, and a tiny temperature gives 0 and -inf
    # (a one-hot distribution) rather than inf - inf = NaN.
    scaled = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    probs, order = scaled.softmax(dim=-1), None
    top_k = [p.top_k if p.top_k and p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p is not None else 1.0 for p in params]
    if min(top_p) < 1 or min(top_k) < vocab:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * (torch.arange(vocab, device=device) < torch.tensor(top_k, device=device)[:, None])
        probs = probs / probs.sum(dim=-1, keepdim=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is still short.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs * (mass_before < torch.tensor(top_p, device=device)[:, None])
    cumulative = probs.cumsum(dim=-1)
    targets = uniforms.to(device=device, dtype=cumulative.dtype)[:, None] * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, targets, right=True).clamp(max=vocab - 1)
    sampled = (order.gather(-1, index) if order is not None else index).squeeze(-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=device)
    return torch.where(is_greedy, greedy, sampled)
