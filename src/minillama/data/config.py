"""The [data] table of a run config: where the prepared shards are, and how to make them when they are not."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Literal

from minillama.config import ConfigSection, PositiveInt


@dataclass(frozen=True)
class DataConfig(ConfigSection):
    table = "data"

    dir: str = "data/fineweb-edu-sample-10BT"  # prepared shards (manifest.json) to train on
    tokenizer: str | None = None  # SentencePiece .model; None: $MINILLAMA_TOKENIZER or Llama 2 from the hub
    source: Literal["fineweb-edu", "text"] = "fineweb-edu"  # what to prepare `dir` from when it is missing
    subset: str = "sample-10BT"  # FineWeb-Edu config to stream
    files: list[str] = field(default_factory=list)  # for source "text": files or globs
    split_paragraphs: bool = False  # for source "text": each blank-line-separated paragraph is a document
    shard_tokens: PositiveInt = 100_000_000  # tokens per shard when preparing
    val_tokens: PositiveInt | None = None  # validation tokens when preparing (None: one shard)
    prepare_workers: PositiveInt = 8  # tokenizer processes when preparing
    auto_prepare: bool = False  # prepare `dir` when missing instead of saying how (large corpora: prepare first)
    train_tokenizer: bool = False  # train a tokenizer of the model's vocab size on `files` if `tokenizer` is missing


def max_workers() -> int:
    """The tokenizer processes `prepare` may start: one per CPU core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_command(data: DataConfig) -> str:
    """The `minillama prepare` command that makes `data.dir` for this config."""
    if data.source == "fineweb-edu":
        parts = ["minillama", "prepare", "fineweb-edu", "--subset", data.subset]
    else:
        parts = ["minillama", "prepare", "text", *data.files] + (["--split-paragraphs"] if data.split_paragraphs else [])
    parts += ["--out", data.dir, "--shard-tokens", str(data.shard_tokens), "--workers", str(min(data.prepare_workers, max_workers()))]
    if data.val_tokens is not None:
        parts += ["--val-tokens", str(data.val_tokens)]
    if data.tokenizer:
        parts += ["--tokenizer", data.tokenizer]
    return shlex.join(parts)

