"""The Llama decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, in the order data flows.

Rotary embeddings rotate adjacent pairs (dims 2i, 2i+1) of each head, as Meta's reference and llama2.c do;
Hugging Face rotates the two halves of a head instead, and `minillama.interop.rotary` converts between the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillama.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # float32 so that the mean of squares neither overflows in fp16 nor loses precision in bf16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), shape (max_seq_len, head_dim/2), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of every head of x (B, T, H, D) by its position's angle; cos/sin (B|1, T, D/2)."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class CacheView(Protocol):
    """One forward pass's use of a KV cache (see `minillama.inference.cache`): where this pass's tokens sit,
    which keys each query may see, and the cached keys/values to attend over."""

    positions: Tensor  # (B, T) rotary position of each token
    mask: Tensor | None  # (B, 1, T, L) keys each query may see; None when plain causal attention is exact

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]: ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheView | None = None) -> Tensor:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            mask = cache.mask
        # enable_gqa lets SDPA share each kv head among its query heads without copying k and v n_heads/n_kv times.
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and seq_len > 1,  # one query (decoding) sees every attended key
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheView | None = None) -> Tensor:
        h = x + self.residual_dropout(self.attention(self.attention_norm(x), cos, sin, cache))
        return h + self.residual_dropout(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        """`Module.to(dtype)` casts buffers too; rebuild the rotary tables in float32 when that happens, since
        bf16's 8-bit mantissa would blur the angles of late positions (training keeps them float32 as well)."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            cos, sin = rotary_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere; wo and w2, the two projections that add into the residual stream, get an extra
        1/sqrt(2*n_layers) so that the stream's variance stays the same however many blocks add to it."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif param.dim() == 2:
                nn.init.normal_(param, mean=0.0, std=0.02)
            else:
                nn.init.ones_(param)  # RMSNorm gains

    def forward(self, tokens: Tensor, targets: Tensor | None = None, cache: CacheView | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for tokens (B, T), and the mean cross-entropy over targets that are not -1."""
        logits = self.output(self.hidden_states(tokens, cache))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def hidden_states(self, tokens: Tensor, cache: CacheView | None = None) -> Tensor:
        """The final normed states (B, T, dim), before the output head: callers that need logits at a few
        positions only (sampling, scoring endings) apply `self.output` to those and skip the rest of the head.

        Without a cache the sequence starts at position 0 and attention is causal. With one, the tokens sit at
        `cache.positions` and attend to the cached keys `cache.mask` lets them see.
        """
        x = self.tok_embeddings(tokens)
        if cache is None:
            cos, sin = self.rope_cos[None, : tokens.shape[1]], self.rope_sin[None, : tokens.shape[1]]
        else:
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


def compute_dtype(model: Transformer) -> torch.dtype:
    """The dtype of the model's activations (and so of its KV cache): autocast's when autocast is on, else the weights'."""
    device_type = model.tok_embeddings.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.tok_embeddings.weight.dtype


def meta_model(config: ModelConfig) -> Transformer:
    """The model's structure without memory (meta device): exact names and shapes, for counting parameters,
    listing expected tensors, or `to_empty` before loading weights."""
    with torch.device("meta"):
        return Transformer(config)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) inside the block; the caller's mode is restored after it, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
