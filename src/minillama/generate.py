"""Sampling from a model: completions of a text prompt (`generate`, or `stream` for one as it comes) and of
token prompts (`generate_tokens`), all on the inference engine (`minillama.inference.engine`): the prompt is
processed once (prefill), then each new token costs one position of a KV cache; on CUDA the decode step is a
CUDA graph captured once and replayed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

from minillama.errors import ArgumentError, MiniLlamaError
from minillama.inference.engine import Completion, Engine, Request, check_length
from minillama.inference.sampling import SamplingParams, nth_seed
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer

MAX_SAMPLES = 1024  # completions of one prompt decoded together


def generate_tokens(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_ids: Collection[int] = (), cuda_graph: bool | None = None, compile: bool = False) -> list[list[int]]:
    """New token ids for each prompt, all decoded together; row i samples with seed + i. A row stops at any of
    `stop_ids` (not included) or after `max_new_tokens`, independently of the others."""
    engine, completions = _start(model, None, [(p, 1) for p in prompts], max_new_tokens, temperature, top_k, top_p, seed,
                                 stop_ids, cuda_graph, compile)
    for _ in engine.run():
        pass
    return [c.tokens for c in completions]


def check_num_samples(num_samples: int) -> None:
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise ArgumentError("{num_samples} is {value}; expected from 1 to {limit} (each holds a KV cache row; draw more in "
                            "several calls)", value=num_samples, limit=MAX_SAMPLES)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, num_samples: int = 4, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
             stop_at_eos: bool = True, cuda_graph: bool | None = None, compile: bool = False,
             stop: Sequence[str] = ()) -> list[str]:
    """`num_samples` completions of `prompt` (the new text only); sample i uses seed + i. An empty prompt starts
    from BOS alone. A sample ends where the model ends a document (BOS or EOS) unless `stop_at_eos` is False, and
    before the first of the `stop` strings it writes."""
    check_num_samples(num_samples)
    stop_ids = document_end_ids(tokenizer) if stop_at_eos else ()
    engine, completions = _start(model, tokenizer, [(tokenizer.encode(prompt, bos=True), num_samples)], max_new_tokens,
                                 temperature, top_k, top_p, seed, stop_ids, cuda_graph, compile, stop)
    for _ in engine.run():
        pass
    return [c.text for c in completions]


def stream(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
           top_k: int | None = 50, top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True,
           cuda_graph: bool | None = None, compile: bool = False, stop: Sequence[str] = ()) -> Iterator[str]:
    """One completion of `prompt`, as pieces of text as soon as they are final (a character spelled in several
    byte tokens comes whole, text that may begin a `stop` string is held back); they add up to `generate`'s text
    for the same seed."""
    stop_ids = document_end_ids(tokenizer) if stop_at_eos else ()
    engine, _ = _start(model, tokenizer, [(tokenizer.encode(prompt, bos=True), 1)], max_new_tokens, temperature, top_k, top_p,
                       seed, stop_ids, cuda_graph, compile, stop)
    for update in engine.run():
        if update.text:
            yield update.text


def _start(model: Transformer, tokenizer: Tokenizer | None, prompts: Sequence[tuple[Sequence[int], int]], max_new_tokens: int,
           temperature: float, top_k: int | None, top_p: float | None, seed: int | None, stop_ids: Collection[int],
           cuda_graph: bool | None, compile: bool, stop: Sequence[str] = ()) -> tuple[Engine, list[Completion]]:
    """An engine with a row for each of the (prompt, n) completions, all submitted; the i-th completion in order
    samples with seed + i."""
    if not prompts or any(len(p) == 0 for p, _ in prompts):
        raise MiniLlamaError("a prompt has no tokens; start it with BOS at least")
    if max_new_tokens < 1:
        raise MiniLlamaError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
    longest = max(len(p) for p, _ in prompts)
    check_length(model.config.max_seq_len, longest, max_new_tokens)
    engine = Engine(model, tokenizer, rows=sum(n for _, n in prompts), max_len=longest + max_new_tokens,
                    cuda_graph=cuda_graph, compile=compile)
    completions: list[Completion] = []
    for prompt, n in prompts:
        sampling = SamplingParams(temperature, top_k, top_p, nth_seed(seed, len(completions)))
        completions += engine.submit(Request(list(prompt), max_new_tokens, sampling, n=n, stop=tuple(stop),
                                             stop_ids=frozenset(stop_ids)))
    return engine, completions


def document_end_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The tokens that end a document for a model: BOS, which training puts between documents (so a model ends one
    by starting the next, and run.c stops there too), and EOS, for models trained with it."""
    return tokenizer.bos_id, tokenizer.eos_id
