"""Run configs: dataclasses with a default, a type and a line of explanation per field, read from TOML.

A run config file is TOML whose tables mirror these dataclasses. The [model] table names a preset and may
override any ModelConfig field. `--set section.field=value` overrides anything after the file is read.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.config import ModelConfig, from_dict, parse_override, preset, to_dict
from minillama.errors import MiniLlamaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/fineweb-edu-sample-10BT"  # prepared shards (manifest.json) to train on
    tokenizer: str | None = None  # SentencePiece .model; None: $MINILLAMA_TOKENIZER or Llama 2 from the hub
    source: str = "fineweb-edu"  # what to prepare `dir` from when it is missing: "fineweb-edu" or "text"
    subset: str = "sample-10BT"  # FineWeb-Edu config to stream
    files: list[str] = field(default_factory=list)  # for source "text": files or globs
    split_paragraphs: bool = False  # for source "text": each blank-line-separated paragraph is a document
    shard_tokens: int = 100_000_000  # tokens per shard when preparing
    val_tokens: int | None = None  # validation tokens when preparing (None: one shard)
    prepare_workers: int = 8  # tokenizer processes when preparing
    auto_prepare: bool = False  # prepare `dir` when missing instead of saying how (large corpora: prepare first)
    train_tokenizer: bool = False  # train a tokenizer of the model's vocab size on `files` if `tokenizer` is missing


@dataclass(frozen=True)
class BatchConfig:
    total_tokens: int = 524_288  # tokens per optimizer step (2**19, about 0.5M as in GPT-3 small), all ranks together
    micro_batch: int = 64  # sequences per forward pass per rank; gradient accumulation makes up the rest
    seq_len: int = 1024  # tokens per sequence


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # floor of the cosine decay (10% of peak)
    warmup_steps: int = 715  # linear warmup from lr/warmup_steps (375M tokens at 0.5M per step, as GPT-3)
    max_steps: int = 19_073  # end of the cosine decay: 10B tokens / 524,288 per step = one epoch of sample-10BT
    weight_decay: float = 0.1  # on 2-D weights only (matmuls, embeddings); norms are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)


@dataclass(frozen=True)
class EvalConfig:
    interval: int = 250  # evaluate every this many steps, and at the last step
    val_tokens: int = 10_485_760  # validation tokens per evaluation, split across ranks (fixed for any GPU count)
    hellaswag: bool = True  # HellaSwag accuracy at each evaluation when a HellaSwag file can be had
    hellaswag_file: str | None = None  # local HellaSwag jsonl; None: download the official validation file
    hellaswag_limit: int | None = None  # score only the first N examples
    prompts: list[str] = field(default_factory=lambda: ["To stay healthy, I have to", "Hello, I'm a language model,"])
    num_samples: int = 2  # samples per prompt
    sample_tokens: int = 32  # new tokens per sample
    top_k: int = 50


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 1000  # save every this many steps, and at the end
    keep_last: int = 3  # checkpoints kept; the newest complete one is never deleted


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (needs the tensorboard package)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "minillama"


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/mini-llama-109M"  # logs, metrics.jsonl, config and checkpoints go here
    model_preset: str = "mini-llama-109M"  # the preset the [model] table started from
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 1337
    device: str = "auto"  # auto (cuda, then mps, then cpu), or a torch device string
    dtype: str = "auto"  # auto: bf16 autocast where supported, fp16 + grad scaler on older GPUs, fp32 on CPU
    compile: bool | str = "auto"  # "auto" (on for CUDA), true or false
    stop_at_step: int | None = None  # stop after this step without changing the schedule (None: optim.max_steps)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step

    def __post_init__(self) -> None:
        choices = {"dtype": ("auto", "bfloat16", "float16", "float32"), "compile": ("auto", True, False),
                   "on_nonfinite": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MiniLlamaError(f"run config field '{name}' is {getattr(self, name)!r}; expected one of {', '.join(map(_toml_value, allowed))}")
        positive = {"batch.total_tokens": self.batch.total_tokens, "batch.micro_batch": self.batch.micro_batch,
                    "batch.seq_len": self.batch.seq_len, "optim.max_steps": self.optim.max_steps,
                    "eval.interval": self.eval.interval, "eval.val_tokens": self.eval.val_tokens,
                    "checkpoint.interval": self.checkpoint.interval, "checkpoint.keep_last": self.checkpoint.keep_last}
        for name, value in positive.items():
            if value < 1:
                raise MiniLlamaError(f"run config field '{name}' is {value}; expected a positive integer")
        if self.batch.seq_len > self.model.max_seq_len:
            raise MiniLlamaError(
                f"run config field 'batch.seq_len' is {self.batch.seq_len}; expected at most model.max_seq_len={self.model.max_seq_len}"
            )
        if not 0 <= self.optim.warmup_steps < self.optim.max_steps:
            raise MiniLlamaError(f"run config field 'optim.warmup_steps' is {self.optim.warmup_steps}; expected 0 <= it < optim.max_steps")

    @property
    def last_step(self) -> int:
        return self.stop_at_step if self.stop_at_step is not None else self.optim.max_steps


def _resolve_model(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace the [model] table (preset + overrides) by the full ModelConfig it names."""
    raw = dict(raw)
    table = dict(raw.get("model", {}))
    name = table.pop("preset", raw.get("model_preset", TrainConfig.model_preset))
    raw["model_preset"] = name
    base = to_dict(preset(name))
    unknown = table.keys() - base.keys()
    if unknown:
        raise MiniLlamaError(f"{where}: unknown field 'model.{sorted(unknown)[0]}'; known fields: preset, {', '.join(base)}")
    raw["model"] = {**base, **table}
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        keys, value = parse_override(text)
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
        except tomllib.TOMLDecodeError as exc:
            raise MiniLlamaError(f"{path} is not valid TOML ({exc})") from None
    raw = apply_overrides(raw, list(overrides))
    return from_dict(TrainConfig, _resolve_model(raw, where), where)


def config_to_toml(config: TrainConfig) -> str:
    """The fully resolved config as TOML, loadable by load_train_config (saved in the run directory)."""
    data = to_dict(config)
    data["model"] = {"preset": data.pop("model_preset"), **data["model"]}
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
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def prepare_command(data: DataConfig) -> str:
    """The `minillama prepare` command that makes `data.dir` for this config."""
    if data.source == "fineweb-edu":
        parts = ["minillama", "prepare", "fineweb-edu", "--subset", data.subset]
    else:
        parts = ["minillama", "prepare", "text", *data.files] + (["--split-paragraphs"] if data.split_paragraphs else [])
    parts += ["--out", data.dir, "--shard-tokens", str(data.shard_tokens), "--workers", str(data.prepare_workers)]
    if data.val_tokens is not None:
        parts += ["--val-tokens", str(data.val_tokens)]
    if data.tokenizer:
        parts += ["--tokenizer", data.tokenizer]
    return shlex.join(parts)

