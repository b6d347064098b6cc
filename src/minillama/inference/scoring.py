"""Log-probabilities of given tokens at given positions: the output head, a vocabulary-wide matmul and the
largest of a small model, runs only where a token is scored, a bounded number of positions at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minillama.model import Transformer

HEAD_ROWS = 512  # positions through the output head at once: each holds vocab_size float32 logits


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (its raw distribution, before temperature or cuts), and the
    most likely tokens at that position with theirs; `logprob` is None for a sequence's first token."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


@dataclass
class Scores:
    log_probs: Tensor  # (N,) float32: log p(target) at each position
    greedy: Tensor  # (N,) bool: the target is the most likely token there
    top_ids: Tensor  # (N, top) the most likely tokens, most likely first
    top_log_probs: Tensor  # (N, top)

    @classmethod
    def of_logits(cls, logits: Tensor, targets: Tensor, top: int = 0) -> Scores:
        log_softmax = F.log_softmax(logits.float(), dim=-1)
        top_log_probs, top_ids = log_softmax.topk(top, dim=-1)
        return cls(log_softmax.gather(-1, targets[:, None]).squeeze(-1), log_softmax.argmax(-1) == targets, top_ids, top_log_probs)

    def entries(self, targets: list[int]) -> list[TokenLogprobs]:
        top = [tuple(zip(ids, values)) for ids, values in zip(self.top_ids.tolist(), self.top_log_probs.tolist())]
        return [TokenLogprobs(t, lp, alternatives) for t, lp, alternatives in zip(targets, self.log_probs.tolist(), top)]


def score_targets(model: Transformer, states: Tensor, targets: Tensor, top: int = 0) -> Scores:
    """Score `targets` (N,) as predicted from the final hidden `states` (N, dim), with the `top` alternatives."""
    parts = [Scores.of_logits(model.output(states[start : start + HEAD_ROWS]), targets[start : start + HEAD_ROWS], top)
             for start in range(0, max(len(targets), 1), HEAD_ROWS)]  # one part even for none
    return Scores(*(torch.cat([getattr(p, name) for p in parts]) for name in ("log_probs", "greedy", "top_ids", "top_log_probs")))
