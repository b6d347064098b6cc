"""The KV cache: keys and values of every earlier position, so that one more token costs one position of work.

The cache is a set of rows ("slots", as llama.cpp's server calls them), each holding one sequence from
position 0: the key of position p sits at index p of its row. Rows advance independently, so a sequence can
join while others are halfway through (continuous batching) and leave without waiting for them. A forward pass
addresses a contiguous range of rows (`CachedPass`); what lies beyond a row's own positions is left over from
an earlier sequence, never seen, because a query at position p sees only keys at positions <= p.

Storing n_kv_heads per layer, not n_heads, carries grouped-query attention's memory saving over.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minillama.config import ModelConfig


class KVCache(nn.Module):
    """`rows` sequences of up to `max_len` positions, preallocated so shapes never change (CUDA graphs replay)."""

    def __init__(self, config: ModelConfig, rows: int, max_len: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        shape = (config.n_layers, rows, config.kv_heads, max_len, config.head_dim)
        self.register_buffer("keys", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("values", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Give row `target` the first `length` positions of row `source` (a shared prompt, a row moving)."""
        for cached in (self.keys, self.values):
            cached[:, target, :, :length] = cached[:, source, :, :length]


class CachedPass:
    """One forward pass over rows `rows` of a cache: token t of row b sits at `positions[b, t]`, where its key and
    value are written, and attends over the row's first `attend` positions (None: all, for static shapes).

    `aligned` (known to the caller without asking the device) says that every row's tokens fill the last
    positions of the attended range: then causal attention is exact, no mask is built, and CUDA may pick its
    flash kernel. Otherwise each query sees the keys at positions up to its own.
    """

    def __init__(self, cache: KVCache, rows: slice, positions: Tensor, attend: int | None, aligned: bool = False):
        self.cache, self.rows, self.positions = cache, rows, positions
        self.attend = attend if attend is not None else cache.max_len
        self.row_index = torch.arange(rows.start, rows.stop, device=positions.device)[:, None]
        self.mask = None if aligned else visible_keys(torch.arange(self.attend, device=positions.device), positions)

    @classmethod
    def starting_at(cls, cache: KVCache, rows: slice, starts: list[int], tokens: int, round_to: int = 1) -> CachedPass:
        """`tokens` tokens per row from each row's position `starts[b]`, attending over everything before them
        (over a range rounded up to a multiple of `round_to`, where each new shape has a cost)."""
        device = cache.keys.device
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(tokens, device=device)
        end = max(starts) + tokens
        attend = min(-(-end // round_to) * round_to, cache.max_len)
        return cls(cache, rows, positions, attend, aligned=attend == end and all(start == end - tokens for start in starts))

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write this pass's keys/values (B, H_kv, T, D) at their positions; return the attended range of its rows."""
        for cached, new in ((self.cache.keys[layer], keys), (self.cache.values[layer], values)):
            cached[self.row_index, :, self.positions] = new.transpose(1, 2)
        return (self.cache.keys[layer, self.rows, :, : self.attend], self.cache.values[layer, self.rows, :, : self.attend])


class SharedPrefixes:
    """Continuations of cached prefixes, several per prefix, in one pass without writing the cache: row i
    continues row `owners[i]` of `prefixes` after its `lengths[i]` positions (the endings of one context share
    it). The prefixes' keys are gathered per layer as attention needs them, never copied for the whole model."""

    def __init__(self, prefixes: KVCache, owners: Tensor, lengths: Tensor, width: int, positions: Tensor):
        self.prefixes, self.owners, self.width, self.positions = prefixes, owners, width, positions
        device = positions.device
        prefix_positions = torch.arange(width, device=device).expand(len(owners), width)
        # A prefix's positions past its own length hold another sequence's leftovers: never visible.
        prefix_positions = prefix_positions.masked_fill(prefix_positions >= lengths[:, None], torch.iinfo(torch.long).max)
        self.mask = visible_keys(torch.cat([prefix_positions, positions], dim=1), positions)

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.cat([self.prefixes.keys[layer, :, :, : self.width][self.owners], keys], dim=2),
                torch.cat([self.prefixes.values[layer, :, :, : self.width][self.owners], values], dim=2))


def visible_keys(key_positions: Tensor, query_positions: Tensor) -> Tensor:
    """(B, 1, T, L) mask of the keys each query may see: those at positions up to its own. `key_positions` is
    (L,) for keys at the same positions in every row, or (B, L). A query sees at least its own key, so even a
    padding query's attention stays finite."""
    if key_positions.dim() == 1:
        key_positions = key_positions[None]
    return (key_positions[:, None, :] <= query_positions[:, :, None]).unsqueeze(1)


def right_padded(sequences: list[list[int]], width: int) -> Tensor:
    """(len(sequences), width) token ids, each sequence from position 0 and zeros after it: with causal attention
    the padding only ever follows a sequence's own tokens, so it changes nothing they compute."""
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return tokens
