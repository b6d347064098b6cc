"""Model configuration, named presets, and the dataclass <-> dict/TOML plumbing every config in the project shares."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from minillama.errors import MiniLlamaError

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama decoder. Field names follow Meta's reference `ModelArgs` so configs read the same."""

    dim: int = 768  # width of the residual stream
    n_layers: int = 12  # number of transformer blocks
    n_heads: int = 12  # query heads per attention layer
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None means n_heads
    vocab_size: int = 32000  # tokenizer vocabulary size
    hidden_dim: int | None = None  # SwiGLU hidden width; None derives it by Llama's rule
    multiple_of: int = 256  # the derived hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the derived hidden width before rounding
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 1024  # longest sequence the model is trained and sampled at, in tokens
    dropout: float = 0.0  # dropout on attention probabilities and residual branches, during training only
    rope_theta: float = 10000.0  # base of the rotary embedding frequencies
    tie_embeddings: bool = True  # output head shares the token embedding matrix

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        _require(self.n_kv_heads is None or self.n_kv_heads > 0, "n_kv_heads", self.n_kv_heads, "a positive integer or null")
        _require(self.hidden_dim is None or self.hidden_dim > 0, "hidden_dim", self.hidden_dim, "a positive integer or null")
        _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "a positive number")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a positive number")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        _require(
            self.ffn_dim_multiplier is None or self.ffn_dim_multiplier > 0,
            "ffn_dim_multiplier", self.ffn_dim_multiplier, "a positive number or null",
        )
        _require(self.dim % self.n_heads == 0, "dim", self.dim, f"a multiple of n_heads={self.n_heads}")
        _require(self.head_dim % 2 == 0, "dim", self.dim, f"dim/n_heads even for rotary embeddings (head_dim is {self.head_dim})")
        _require(
            self.n_heads % self.kv_heads == 0,
            "n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}",
        )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Llama's rule: 4*dim, two thirds of it (SwiGLU has three matrices, not two), scaled, rounded up."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise MiniLlamaError(f"model config field '{field}' is {value!r}; expected {allowed}")


PRESETS: dict[str, ModelConfig] = {
    # The reference run: 109,529,856 parameters with the Llama 2 vocabulary.
    "mini-llama-109M": ModelConfig(),
    # Tests and laptops: 443,232 parameters, GQA on, a 512-token vocabulary (train one with `minillama tokenizer train`).
    "tiny": ModelConfig(
        dim=96, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256
    ),
    # GPT-2-medium width and depth on Llama blocks.
    "mini-llama-341M": ModelConfig(dim=1024, n_layers=24, n_heads=16, max_seq_len=2048),
    # TinyLlama's shape (2048 wide, 22 layers, 32 query / 4 kv heads, hidden 5632, untied head).
    "mini-llama-1.1B": ModelConfig(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048, tie_embeddings=False
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise MiniLlamaError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- dataclass <-> plain data, shared by model and run configs -------------------------------------------------


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `data`, refusing unknown fields and wrong types with a message naming `where`."""
    if not isinstance(data, dict):
        raise MiniLlamaError(f"{where}: expected a table of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise MiniLlamaError(f"{where}: unknown field '{key}'; known fields: {', '.join(fields)}")
        values[key] = _coerce(value, hints[key], f"{where}: field '{key}'")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, converting the lossless cases TOML and JSON produce (int for float)."""
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except MiniLlamaError:
                pass
        raise MiniLlamaError(f"{where} is {value!r}; expected {_type_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MiniLlamaError(f"{where} is {value!r}; expected a list")
        (item,) = typing.get_args(hint)[:1]
        return origin(_coerce(v, item, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise MiniLlamaError(f"{where} is {value!r}; expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], value), reading the value as JSON when it parses, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise MiniLlamaError(f"--set '{text}': expected key=value, for example --set optim.lr=3e-4")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = {"true": True, "false": False, "none": None, "null": None}.get(raw.lower(), raw)
    return key.split("."), value

