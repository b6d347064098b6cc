"""What a training run measures at each eval interval: validation loss, HellaSwag accuracy, and samples from
fixed prompts, all logged as one record each."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from minillama.device import autocast
from minillama.errors import MiniLlamaError
from minillama.eval.hellaswag import (
    Example,
    download_hellaswag,
    evaluate_hellaswag,
    load_examples,
)
from minillama.eval.loss import evaluate_loss
from minillama.generate import generate
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer
from minillama.train.config import EvalConfig
from minillama.distributed import Distributed, any_rank
from minillama.train.parallel import whole_weights
from minillama.train.run import Run


def load_hellaswag(config: EvalConfig, ctx: Distributed, device: torch.device) -> list[Example] | None:
    """The HellaSwag examples to score during training, or None (with a warning) when none can be had. All ranks
    decide together: a download that fails on one rank turns HellaSwag off on every rank, since scoring is collective."""
    try:
        path = Path(config.hellaswag_file) if config.hellaswag_file else download_hellaswag()
        examples = load_examples(path, config.hellaswag_limit)
    except MiniLlamaError as exc:
        if config.hellaswag_file:
            raise
        warnings.warn(f"HellaSwag is off for this run: {exc}", stacklevel=2)
        examples = None
    return None if any_rank(examples is None, ctx, device) else examples


def evaluate_and_sample(run: Run) -> None:
    """Validation loss (every rank, compiled model), HellaSwag (every rank) and samples (rank 0), at run.state.step."""
    config, state, ctx = run.config, run.state, run.ctx
    with whole_weights(run.model, run.compiled) as (model, compiled), autocast(run.device, run.precision):
        val = evaluate_loss(compiled, run.data_dir, run.tokenizer, config.batch.micro_batch, config.batch.seq_len,
                            config.eval.val_tokens, ctx.rank, ctx.world_size)
        state.best_val_loss = min(state.best_val_loss, val["loss"])
        record = {"kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen, "val_loss": val["loss"],
                  "val_bits_per_byte": val["bits_per_byte"], "val_perplexity": val["perplexity"]}
        line = f"step {state.step:6d} | val loss {val['loss']:.4f} | val bpb {val['bits_per_byte']:.4f}"
        if run.hellaswag:
            # A HellaSwag example is 4 sequences: micro_batch // 4 examples make a forward pass of a micro-batch's size.
            examples_per_batch = max(1, config.batch.micro_batch // 4)
            with uncompiled():
                result = evaluate_hellaswag(model, run.tokenizer, run.hellaswag, examples_per_batch, ctx.rank, ctx.world_size)
            record["hellaswag_acc_norm"], record["hellaswag_examples"] = result["acc_norm"], result["examples"]
            line += f" | hellaswag {result['acc_norm']:.4f} ({result['examples']} examples)"
        run.logger.log(record, line)
        if ctx.is_main:  # samples are for reading, not a metric: rank 0 alone, so other ranks need not wait
            with uncompiled():
                texts = samples(model, run.tokenizer, config.eval, seed=config.seed + state.step)
            run.logger.log({"kind": "samples", "step": state.step, "samples": texts},
                           "\n".join(f"  sample {i}: {s!r}" for i, s in enumerate(texts)))


def uncompiled() -> contextlib.AbstractContextManager:
    """Blocks compiled in place (fsdp compiles each block of the gathered view) run eagerly inside: scoring and
    sampling change shapes with every prompt, and would recompile them each time."""
    return torch.compiler.set_stance("force_eager")


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
