"""Model configuration, named presets, and the dataclass <-> dict/TOML plumbing every config in the project shares."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from minillama.errors import MiniLlamaError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric config field, checked whenever a config is built: `Annotated[int, Range(min=1)]`.
    NaN is outside every range."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself is excluded
    max_open: bool = False  # max itself is excluded

    def contains(self, value: float) -> bool:
        if value != value:  # NaN
            return False
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return self.max is None or (value < self.max if self.max_open else value <= self.max)

    def describe(self, integer: bool) -> str:
        def num(x: float) -> str:
            return f"{int(x):,}" if x == int(x) else repr(x)

        kind = "an integer" if integer else "a number"
        if integer and self.min == 1 and not self.min_open and self.max is None:
            return "a positive integer"
        if self.min is not None and self.max is not None:
            return f"{kind} in {'(' if self.min_open else '['}{num(self.min)}, {num(self.max)}{')' if self.max_open else ']'}"
        if self.min is not None:
            return f"{kind} {'>' if self.min_open else '>='} {num(self.min)}"
        return f"{kind} {'<' if self.max_open else '<='} {num(self.max)}"


POSITIVE = Range(min=1)
NON_NEGATIVE = Range(min=0)
ABOVE_ZERO = Range(min=0, min_open=True)
PositiveInt = Annotated[int, POSITIVE]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama decoder. Field names follow Meta's reference `ModelArgs` so configs read the same."""

    dim: PositiveInt = 768  # width of the residual stream
    n_layers: PositiveInt = 12  # number of transformer blocks
    n_heads: PositiveInt = 12  # query heads per attention layer
    n_kv_heads: PositiveInt | None = None  # key/value heads (grouped-query attention); None means n_heads
    vocab_size: PositiveInt = 32000  # tokenizer vocabulary size
    hidden_dim: PositiveInt | None = None  # SwiGLU hidden width; None derives it by Llama's rule
    multiple_of: PositiveInt = 256  # the derived hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: Annotated[float, ABOVE_ZERO] | None = None  # scales the derived hidden width before rounding
    norm_eps: Annotated[float, ABOVE_ZERO] = 1e-5  # RMSNorm epsilon
    max_seq_len: Annotated[int, Range(min=1, max=1 << 20)] = 1024  # longest sequence trained and sampled at, in tokens
    dropout: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.0  # on attention and residual branches, training only
    rope_theta: Annotated[float, ABOVE_ZERO] = 10000.0  # base of the rotary embedding frequencies
    tie_embeddings: bool = True  # output head shares the token embedding matrix

    def __post_init__(self) -> None:
        check_fields(self, "model config field '{}'")
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


# --- dataclass <-> plain data, shared by model and run configs -------------------------------------------------


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `data`, refusing unknown fields and wrong types with a message naming `where`.
    Choices and ranges are checked by the dataclass itself (`check_fields`), however it is built."""
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
    if origin is typing.Literal:
        # `--set field=none` reads as null; where "none" is one of the choices, that is what was meant.
        return "none" if value is None and "none" in typing.get_args(hint) else value  # which of the choices: check_fields
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None) or (typing.get_origin(option) is typing.Literal and value not in typing.get_args(option)):
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
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(json.dumps(choice) for choice in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Annotated:
        return _type_name(typing.get_args(hint)[0])
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(config: Any, name_format: str) -> None:
    """Check each field of a config dataclass against its annotation: `Literal` choices and `Range` bounds, and
    no NaN or infinity in any number. `name_format` names a field in the message, e.g. "run config field 'optim.{}'"."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = _violated(value, hints[field.name])
        if expected:
            raise MiniLlamaError(f"{name_format.format(field.name)} is {_show(value)}; expected {expected}")


def _violated(value: Any, hint: Any) -> str | None:
    """What `hint` expects, when `value` breaks one of its choices or bounds; None when it does not."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        problems = [_violated(value, option) for option in options]
        if all(problems):
            return " or ".join(problems) + (" or null" if len(options) < len(typing.get_args(hint)) else "")
        return None
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            return "one of " + ", ".join(_show(c) for c in choices)
        return None
    if origin is typing.Annotated:
        base, *extras = typing.get_args(hint)
        for extra in extras:
            if isinstance(extra, Range) and isinstance(value, (int, float)) and not extra.contains(value):
                return extra.describe(integer=base is int)
        return _violated(value, base)
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    return None


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML or --set (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


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


class ConfigSection:
    """A table of the run config; its fields are checked against their annotations whenever it is built."""

    table: ClassVar[str]  # its [name] in the TOML file

    def __post_init__(self) -> None:
        check_fields(self, f"run config field '{self.table}.{{}}'")
