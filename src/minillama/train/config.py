"""Run configs: dataclasses with a default, a type and a line of explanation per field, read from TOML.

A run config file is TOML whose tables mirror these dataclasses. The [model] table names a preset and may
override any ModelConfig field. `--set section.field=value` overrides anything after the file is read.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import sys
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from minillama.config import (
    ABOVE_ZERO,
    ConfigSection,
    NON_NEGATIVE,
    ModelConfig,
    PRESETS,
    PositiveInt,
    Range,
    check_fields,
    from_dict,
    parse_override,
    preset,
    to_dict,
)
from minillama.data.config import DataConfig
from minillama.errors import MiniLlamaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class BatchConfig(ConfigSection):
    table = "batch"

    total_tokens: PositiveInt = 524_288  # tokens per optimizer step (2**19, about 0.5M as in GPT-3 small), all ranks together
    micro_batch: PositiveInt | Literal["auto"] = 64  # sequences per forward pass per rank ("auto": the most that fit); accumulation makes up the rest
    seq_len: PositiveInt = 1024  # tokens per sequence
    stages: list[tuple[int, int]] = field(default_factory=list)  # [[until_step, tokens], ...]: fewer tokens per step before each until_step (a batch-size warmup)

    def __post_init__(self) -> None:
        super().__post_init__()
        pairs = [stage for stage in self.stages if len(stage) == 2 and all(isinstance(n, int) and n > 0 for n in stage)]
        steps, sizes = [until for until, _ in pairs], [tokens for _, tokens in pairs] + [self.total_tokens]
        if (len(pairs) < len(self.stages) or steps != sorted(set(steps)) or sizes != sorted(set(sizes))
                or any(tokens % self.seq_len for tokens in sizes[:-1])):
            raise MiniLlamaError(
                f"run config field 'batch.stages' is {json.dumps(self.stages)}; expected [[until_step, tokens], ...] with "
                f"until_step and tokens rising, tokens multiples of batch.seq_len={self.seq_len} and below "
                f"batch.total_tokens={self.total_tokens}, e.g. [[200, {self.total_tokens // 4 // self.seq_len * self.seq_len}]]")

    def tokens_at(self, step: int) -> int:
        """Tokens in optimizer step `step` (counted from 0): its stage's, else total_tokens."""
        return next((tokens for until, tokens in self.stages if step < until), self.total_tokens)

    def tokens_between(self, first: int, last: int) -> int:
        """Tokens in steps first..last-1."""
        total, step = 0, first
        for until, tokens in self.stages:
            if min(until, last) > step:
                total, step = total + (min(until, last) - step) * tokens, min(until, last)
        return total + max(0, last - step) * self.total_tokens

    @property
    def step_sizes(self) -> list[int]:
        """Every number of tokens a step may have, smallest first."""
        return [tokens for _, tokens in self.stages] + [self.total_tokens]


@dataclass(frozen=True)
class OptimConfig(ConfigSection):
    table = "optim"

    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW (at lr) for embedding, head and norms
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup, stable at the peak, linear decay over the last decay_fraction
    lr: Annotated[float, ABOVE_ZERO] = 6e-4  # peak learning rate (of AdamW's parameters), reached after warmup
    min_lr: Annotated[float, NON_NEGATIVE] = 6e-5  # where the decay ends (10% of peak); Muon's ends at the same fraction of muon_lr
    warmup_steps: Annotated[int, NON_NEGATIVE] = 715  # linear warmup from lr/warmup_steps (375M tokens at 0.5M per step, as GPT-3)
    max_steps: PositiveInt = 19_073  # end of the decay: 10B tokens / 524,288 per step = one epoch of sample-10BT
    decay_fraction: Annotated[float, Range(min=0, max=1, min_open=True)] = 0.2  # wsd: the last fifth of max_steps decays
    muon_lr: Annotated[float, ABOVE_ZERO] = 0.02  # Muon's peak lr, scaled per matrix by sqrt(max(1, rows/cols)) (Keller Jordan's rule)
    muon_momentum: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.95  # Nesterov momentum of Muon
    muon_momentum_warmup_steps: Annotated[int, NON_NEGATIVE] = 0  # Muon's momentum rises linearly from muon_momentum_start over these steps
    muon_momentum_start: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.85  # where the momentum warmup starts (modded-nanogpt: 0.85)
    muon_momentum_cooldown_steps: Annotated[int, NON_NEGATIVE] = 0  # Muon's momentum falls back to muon_momentum_start over these last steps before max_steps
    muon_weight_decay: Annotated[float, NON_NEGATIVE] = 0.0  # decoupled, times muon_lr (Muon's original recipe has none)
    muon_cautious_weight_decay: bool = False  # decay only the weights the update already moves toward zero (Chen et al. 2025)
    muon_orthogonalization: Literal["newton_schulz", "polar_express"] = "newton_schulz"  # polar_express: Amsel et al. 2025's per-iteration coefficients
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1  # on 2-D weights only (matmuls, embeddings); norms are not decayed
    embedding_lr_multiplier: Annotated[float, ABOVE_ZERO] = 1.0  # AdamW's rate for the embedding (and an untied head), times lr
    norm_lr_multiplier: Annotated[float, ABOVE_ZERO] = 1.0  # AdamW's rate for the norm gains, times lr
    beta1: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.9  # AdamW's decay of the gradient mean
    beta2: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.95  # of the squared-gradient mean (0.95, not 0.999: steadier for LLMs)
    eps: Annotated[float, ABOVE_ZERO] = 1e-8  # added to the root of the squared-gradient mean, against division by ~0
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0  # clip the global gradient norm to this (0 disables)


@dataclass(frozen=True)
class EvalConfig(ConfigSection):
    table = "eval"

    interval: PositiveInt = 250  # evaluate every this many steps, and at the last step
    val_tokens: PositiveInt = 10_485_760  # validation tokens per evaluation, split across ranks (fixed for any GPU count)
    hellaswag: bool = True  # HellaSwag accuracy at each evaluation when a HellaSwag file can be had
    hellaswag_file: str | None = None  # local HellaSwag jsonl; None: download the official validation file
    hellaswag_limit: PositiveInt | None = None  # score only the first N examples
    prompts: list[str] = field(default_factory=lambda: ["To stay healthy, I have to", "Hello, I'm a language model,"])  # sampled at each evaluation
    num_samples: Annotated[int, NON_NEGATIVE] = 2  # samples per prompt (0: none)
    sample_tokens: PositiveInt = 32  # new tokens per sample
    top_k: PositiveInt = 50  # samples draw from the k most likely tokens


@dataclass(frozen=True)
class CheckpointConfig(ConfigSection):
    table = "checkpoint"

    interval: PositiveInt = 1000  # save every this many steps, and at the end
    keep_last: PositiveInt = 3  # checkpoints kept; the newest complete one is never deleted


@dataclass(frozen=True)
class LogConfig(ConfigSection):
    table = "log"

    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (needs the tensorboard package)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "minillama"  # the Weights & Biases project runs are logged under


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/mini-llama-109M"  # logs, metrics.jsonl, config and checkpoints go here
    model_preset: str = "mini-llama-109M"  # a label: the preset [model] started from (set it with [model] preset = ...)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: Annotated[int, Range(min=0, max=2**63 - 1)] = 1337  # initial weights, data order and sampling all follow it
    device: str = "auto"  # auto (cuda, then mps, then cpu), or a torch device string
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 autocast where native, fp16 + grad scaler on older GPUs, fp32 on CPU
    compile: Literal["auto", True, False] = "auto"  # torch.compile the model: "auto" (on for CUDA), true or false
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: a whole copy of model and optimizer per rank; fsdp: sharded over the ranks (FSDP2)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # recompute activations in backward: every block (full) or every other
    stop_at_step: PositiveInt | None = None  # stop after this step without changing the schedule (None: optim.max_steps)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
    zero_init_projections: bool = False  # start each block's output projections (wo, w2) at zero: blocks begin as identities
    threads: PositiveInt | None = None  # CPU threads per process (None: PyTorch's choice); on a busy CPU fewer are faster, often 1

    def __post_init__(self) -> None:
        check_fields(self, "run config field '{}'")
        if self.batch.seq_len > self.model.max_seq_len:
            raise MiniLlamaError(
                f"run config field 'batch.seq_len' is {self.batch.seq_len}; expected at most model.max_seq_len={self.model.max_seq_len}"
            )
        if self.eval.val_tokens < self.batch.seq_len:
            raise MiniLlamaError(f"run config field 'eval.val_tokens' is {self.eval.val_tokens}; expected at least one "
                                 f"sequence of batch.seq_len={self.batch.seq_len} tokens")
        if self.optim.min_lr > self.optim.lr:
            raise MiniLlamaError(f"run config field 'optim.min_lr' is {self.optim.min_lr}; expected at most optim.lr={self.optim.lr} "
                                 "(the decay ends below the peak)")
        if not self.optim.warmup_steps < self.optim.max_steps:
            raise MiniLlamaError(f"run config field 'optim.warmup_steps' is {self.optim.warmup_steps}; expected 0 <= it < optim.max_steps")
        momentum_steps = self.optim.muon_momentum_warmup_steps + self.optim.muon_momentum_cooldown_steps
        if momentum_steps > self.optim.max_steps:
            raise MiniLlamaError(f"run config fields 'optim.muon_momentum_warmup_steps' + 'optim.muon_momentum_cooldown_steps' are "
                                 f"{momentum_steps}; expected at most optim.max_steps={self.optim.max_steps}")

    @property
    def last_step(self) -> int:
        return self.stop_at_step if self.stop_at_step is not None else self.optim.max_steps


def _resolve_model(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace the [model] table by the full ModelConfig it describes: the fields of its `preset` (without one,
    the defaults, which are mini-llama-109M's), overridden by the fields it sets."""
    raw = dict(raw)
    table = raw.get("model", {})
    if not isinstance(table, dict):
        raise MiniLlamaError(f"{where}: 'model' is {json.dumps(table)}; expected a [model] table, e.g. [model] then "
                             "preset = \"tiny\" on the next line")
    table = dict(table)
    if "preset" in table:
        if not isinstance(table["preset"], str):
            raise MiniLlamaError(f"{where}: field 'model.preset' is {json.dumps(table['preset'])}; expected a preset name "
                                 f"(one of: {', '.join(PRESETS)})")
        raw["model_preset"] = table.pop("preset")
        base = to_dict(preset(raw["model_preset"]))
    else:
        base = to_dict(ModelConfig())
    unknown = table.keys() - base.keys()
    if unknown:
        raise MiniLlamaError(f"{where}: unknown field 'model.{sorted(unknown)[0]}'; known fields: preset, {', '.join(base)}")
    raw["model"] = {**base, **table}
    return raw


def _check_override_key(keys: list[str], text: str) -> None:
    """Refuse an override of a field the run config does not have, naming --set (not the config file) as its source."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    section = hints.get(keys[0])
    if len(keys) == 1 and keys[0] in fields and dataclasses.is_dataclass(section):
        example = "preset" if keys[0] == "model" else dataclasses.fields(section)[0].name
        raise MiniLlamaError(f"--set {text}: '{keys[0]}' is a table; set one of its fields, e.g. --set {keys[0]}.{example}=...")
    if keys[0] not in fields or (len(keys) > 1) != dataclasses.is_dataclass(section) or len(keys) > 2:
        sections = [name for name in fields if dataclasses.is_dataclass(hints[name])]
        raise MiniLlamaError(f"--set {text}: the run config has no field '{'.'.join(keys)}'; its fields are "
                             f"{', '.join(name for name in fields if name not in sections and name != 'model_preset')} "
                             f"and the tables {', '.join(sections)}")
    if len(keys) == 2:
        known = [f.name for f in dataclasses.fields(section)] + (["preset"] if keys[0] == "model" else [])
        if keys[1] not in known:
            raise MiniLlamaError(f"--set {text}: the [{keys[0]}] table has no field '{keys[1]}'; its fields are {', '.join(known)}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        keys, value = parse_override(text)
        _check_override_key(keys, text)
        table = raw
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise MiniLlamaError(f"--set {text}: '{key}' is not a section")
        table[keys[-1]] = value
    return raw


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A run config from a TOML file (or the defaults), with `--set key=value` overrides applied."""
    raw: dict[str, Any] = {}
    where = "run config"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MiniLlamaError(f"config file {path} does not exist; see configs/ for examples") from None
        except IsADirectoryError:
            raise MiniLlamaError(f"config file {path} is a directory; pass a .toml file (see configs/)") from None
        except OSError as exc:
            raise MiniLlamaError(f"config file {path} cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise MiniLlamaError(f"config file {path} is not UTF-8 text; pass a .toml file (see configs/)") from None
        except tomllib.TOMLDecodeError as exc:
            raise MiniLlamaError(f"{path} is not valid TOML ({exc})") from None
    combined = apply_overrides(raw, list(overrides))
    try:
        return from_dict(TrainConfig, _resolve_model(combined, where), where)
    except MiniLlamaError:
        if not overrides:
            raise
        from_dict(TrainConfig, _resolve_model(raw, where), where)  # the file alone: its own mistakes are the file's
        return from_dict(TrainConfig, _resolve_model(combined, "--set"), "--set")  # else the overrides' (raises again)


def config_to_toml(config: TrainConfig) -> str:
    """The fully resolved config as TOML (saved in the run directory); load_train_config reads it back equal.

    TOML has no null: a field that is None is left out, and reloads as None because every such field defaults
    to None and [model] is written without a preset, so its omitted fields come from the defaults too."""
    data = to_dict(config)
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are all valid in TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def field_reference() -> list[tuple[str, str, str]]:
    """(key, default as TOML, explanation) for every run config field, the explanations read from the comments
    beside the fields in this module and minillama.config (one source for the code's reader and `train --help`)."""
    from minillama.config import ModelConfig

    defaults = to_dict(TrainConfig())
    rows = []
    for key, value in defaults.items():
        table = value if isinstance(value, dict) else None
        section = typing.get_type_hints(TrainConfig)[key] if table is not None else TrainConfig
        notes = _field_comments(ModelConfig if key == "model" else section)
        for name, default in (table.items() if table is not None else [(key, value)]):
            rows.append((f"{key}.{name}" if table is not None else name, "(none)" if default is None else _toml_value(default),
                         notes.get(name, "")))
    return rows


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the comment ending its line} of a config dataclass."""
    return _comments_by_class(cls.__module__).get(cls.__name__, {})


@functools.cache
def _comments_by_class(module: str) -> dict[str, dict[str, str]]:
    """{class: {field: comment}} for a module's classes, from one read of its source (milliseconds, at `--help`)."""
    source = inspect.getsource(sys.modules[module])
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    return {node.name: {line.target.id: comments[line.lineno] for line in node.body
                        if isinstance(line, ast.AnnAssign) and isinstance(line.target, ast.Name) and line.lineno in comments}
            for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
