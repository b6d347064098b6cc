"""The evaluations a training run makes at each eval interval, behind one small interface: HellaSwag accuracy
and samples from fixed prompts. (Validation loss is `minillama.eval.loss`.)"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from minillama.errors import MiniLlamaError
from minillama.eval.hellaswag import Example, download_hellaswag, evaluate_hellaswag, load_examples
from minillama.generate import generate
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer
from minillama.train.config import EvalConfig
from minillama.train.distributed import Distributed


def load_hellaswag(config: EvalConfig) -> list[Example] | None:
    """The HellaSwag examples to score during training, or None (with a warning) when none can be had."""
    try:
        path = Path(config.hellaswag_file) if config.hellaswag_file else download_hellaswag()
        return load_examples(path, config.hellaswag_limit)
    except MiniLlamaError as exc:
        if config.hellaswag_file:
            raise
        warnings.warn(f"HellaSwag is off for this run: {exc}", stacklevel=2)
        return None


def hellaswag_accuracy(model: Transformer, tokenizer: Tokenizer, examples: list[Example], ctx: Distributed,
                       batch_size: int) -> dict[str, Any]:
    return evaluate_hellaswag(model, tokenizer, examples, max(1, batch_size // 4), ctx.rank, ctx.world_size)


def samples(model: Transformer, tokenizer: Tokenizer, config: EvalConfig, seed: int) -> list[str]:
    """`num_samples` continuations of each prompt, as full texts, reproducible for a given seed."""
    if config.num_samples < 1 or not config.prompts:
        return []
    texts = []
    limit = model.config.max_seq_len
    for index, prompt in enumerate(config.prompts):
        room = limit - len(tokenizer.encode(prompt))
        if room < 1:
            continue
        with torch.random.fork_rng(devices=[]):  # leave the training RNG exactly where it was
            # Eager decoding: a few short samples do not repay capturing a CUDA graph inside training's autocast.
            completions = generate(model, tokenizer, prompt, config.num_samples, min(config.sample_tokens, room),
                                   top_k=config.top_k, seed=seed + index, cuda_graph=False)
        texts += [prompt + c for c in completions]
    return texts
