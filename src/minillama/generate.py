"""Sampling with a KV cache: the prompt is processed once (prefill), then each new token costs one position.

Prompts of different lengths share a batch by left padding: padding slots are written with position -1, which
the cache masks out of every query's view, and each row's rotary positions start at 0 at its first real token.
On CUDA the decode step is captured once as a CUDA graph and replayed, removing the per-kernel launch cost that
dominates small-model decoding; the captured step is kept for later calls of the same batch size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection

import torch
from torch import Tensor

from minillama.errors import MiniLlamaError
from minillama.inference.text import completion_text
from minillama.model import KVCache, Transformer, compute_dtype, evaluating
from minillama.tokenizer import Tokenizer

TokenCallback = Callable[[int, int], "bool | None"]  # (row, token id) as each is chosen; True ends that row there


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not 0 <= temperature < float("inf"):
        raise MiniLlamaError(f"temperature is {temperature}; expected 0 (greedy) or a positive number")
    if top_k is not None and top_k < 0:
        raise MiniLlamaError(f"top_k is {top_k}; expected a positive integer, or 0 (or none) for no top-k cut")
    if top_p is not None and not 0 < top_p <= 1:
        raise MiniLlamaError(f"top_p is {top_p}; expected a number in (0, 1]")


def check_length(model: Transformer, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that leaves no room for `max_new_tokens` within the model's max_seq_len."""
    if max_new_tokens < 1:
        raise MiniLlamaError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
    limit = model.config.max_seq_len
    if prompt_tokens + max_new_tokens > limit:
        raise MiniLlamaError(
            f"a prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the model's max_seq_len of {limit}; "
            f"at most {max(limit - prompt_tokens, 0)} new tokens fit"
        )


def sample_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of logits (B, vocab): greedy at temperature 0, else sampled after top-k and top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:  # 0 or None: no cut
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is still short.
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_EAGER_LENGTH_ROUNDING = 64  # on CUDA, see `_DecodeStep.__call__`
_STATIC_CACHE_ROUNDING = 256  # static caches come in lengths of 256, 512, ... so that prompts of similar size share one


def _last_logits(model: Transformer, tokens: Tensor, cache: KVCache, positions: Tensor, slots: Tensor) -> Tensor:
    """Logits of each row's last position only: the output head, the largest matmul of a small model, skips the rest."""
    return model.output(model.hidden_states(tokens, cache, positions, slots)[:, -1])


class _DecodeStep:
    """A KV cache and the model step that extends it by one token per row.

    Eager steps attend over the filled slots (see __call__). Static steps attend over every slot, the empty ones
    masked, so that every step has the same shapes: they can be compiled (`compile`), and on CUDA they are
    captured once as a CUDA graph and replayed; elsewhere they run as they are. A static step is kept for later
    batches of the same shape (see `_decode_step`); a graph reads the weights where they were at capture.
    """

    def __init__(self, model: Transformer, batch_size: int, cache_len: int, device: torch.device,
                 dtype: torch.dtype, static: bool, compile: bool = False, graph: bool = False):
        self.cache = KVCache(model.config, batch_size, cache_len, device, dtype)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.static = static
        self.padded = False
        self.step = torch.compile(_last_logits, dynamic=False) if compile else _last_logits
        self.graph: torch.cuda.CUDAGraph | None = None
        if static and graph:
            self._capture(model)

    def _forward(self, model: Transformer) -> Tensor:
        return self.step(model, self.token, self.cache, self.position, self.slot)

    def _capture(self, model: Transformer) -> None:
        # Warm up on a side stream (as capture requires; a compiled step compiles here), then record one step.
        # Warm-up and capture write slot 0, which `prefill` overwrites.
        self.cache.length, self.cache.dense = None, False
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(model)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(model)

    def prefill(self, model: Transformer, tokens: Tensor, positions: Tensor, padded: bool) -> Tensor:
        """Fill slots 0..T-1 with the (left-padded, if `padded`) prompts; last logits. A reused cache needs no
        clearing: a query sees only slots up to its own, and each of those is written (or marked padding) by this
        batch. Prompts of one length need no mask at all."""
        self.padded = padded
        self.cache.length, self.cache.dense = tokens.shape[1], not padded
        slots = torch.arange(tokens.shape[1], device=tokens.device)
        return _last_logits(model, tokens, self.cache, positions, slots)

    def __call__(self, model: Transformer, token: Tensor, position: Tensor, slot: int) -> Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        self.slot.fill_(slot)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if self.static:
            self.cache.length, self.cache.dense = None, False
        elif self.token.device.type == "cuda":
            # Attend over the filled slots, rounded up to a block (the rest masked) so that attention sees a new
            # shape only every _EAGER_LENGTH_ROUNDING steps: on a GPU each new shape costs a kernel plan.
            rounded = -(-(slot + 1) // _EAGER_LENGTH_ROUNDING) * _EAGER_LENGTH_ROUNDING
            self.cache.length, self.cache.dense = min(rounded, self.cache.keys.shape[3]), False
        else:  # a CPU pays only for the work: exactly the filled slots, and no mask unless a row is padded
            self.cache.length, self.cache.dense = slot + 1, not self.padded
        return self._forward(model)


# Static decode steps of each live model, newest last; a few, since each holds a KV cache (and on CUDA a graph).
_static_steps: weakref.WeakKeyDictionary[Transformer, dict[tuple, _DecodeStep]] = weakref.WeakKeyDictionary()
_STATIC_STEPS_PER_MODEL = 2


def _decode_step(model: Transformer, batch_size: int, length: int, device: torch.device, static: bool,
                 compile: bool, graph: bool) -> _DecodeStep:
    """A decode step with room for `length` tokens: a fresh eager one, or a static one reused when its shapes
    and the weights' addresses match."""
    dtype = compute_dtype(model)
    if not static:
        return _DecodeStep(model, batch_size, length, device, dtype, static=False)
    rounded = min(model.config.max_seq_len, -(-length // _STATIC_CACHE_ROUNDING) * _STATIC_CACHE_ROUNDING)
    addresses = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    key = (batch_size, rounded, dtype, compile, graph, addresses)
    steps = _static_steps.setdefault(model, {})
    step = steps.pop(key, None)
    if step is None:
        while len(steps) >= _STATIC_STEPS_PER_MODEL:
            del steps[next(iter(steps))]
        step = _DecodeStep(model, batch_size, rounded, device, dtype, static=True, compile=compile, graph=graph)
    steps[key] = step
    return step


@torch.no_grad()
def generate_tokens(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Collection[int] = (),
    cuda_graph: bool | None = None,
    on_token: TokenCallback | None = None,
    compile: bool = False,
    choose: Callable[[Tensor], Tensor] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt. A row stops at any of `stop_ids` (not included), or when `on_token` returns
    True for its token (included), independently of the others; the batch stops when all have.

    `choose` maps the step's logits (B, vocab) to tokens (B,), for callers that sample each row its own way (the
    server); by default every row is sampled with `temperature`, `top_k`, `top_p` and `generator`.

    `cuda_graph` (default: on for CUDA models outside autocast) decodes with static shapes, captured as a CUDA
    graph on CUDA and run eagerly elsewhere. A graph needs the weights in the compute dtype: under autocast,
    whose weight casts live outside any graph, it is refused. `compile` decodes with static shapes too, the step
    compiled once by torch.compile (on CUDA, then also captured as a graph unless `cuda_graph` is False).
    """
    check_sampling_args(temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MiniLlamaError("a prompt has no tokens; start it with BOS at least")
    longest = max(len(p) for p in prompts)
    check_length(model, longest, max_new_tokens)
    device = model.tok_embeddings.weight.device
    batch_size = len(prompts)
    padded = torch.zeros(batch_size, longest, dtype=torch.long)
    positions = torch.full((batch_size, longest), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, longest - len(prompt):] = torch.tensor(prompt)
        positions[row, longest - len(prompt):] = torch.arange(len(prompt))
    padded, positions = padded.to(device), positions.to(device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)

    autocasting = torch.is_autocast_enabled(device.type)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not autocasting
    elif cuda_graph and autocasting:
        raise MiniLlamaError("cuda_graph=True under autocast: cast the model to the compute dtype instead, or pass cuda_graph=False")

    with evaluating(model):
        step = _decode_step(model, batch_size, longest + max_new_tokens, device, static=cuda_graph or compile,
                            compile=compile, graph=cuda_graph and device.type == "cuda")
        logits = step.prefill(model, padded, positions, padded=any(len(p) < longest for p in prompts))
        new_tokens: list[list[int]] = [[] for _ in prompts]
        finished = [False] * batch_size  # on the host: deciding needs no sync beyond the one copy of each step's tokens
        for i in range(max_new_tokens):
            token = choose(logits) if choose else sample_next(logits, temperature, top_k, top_p, generator)
            for row, token_id in enumerate(token.tolist()):
                if finished[row]:
                    continue
                if token_id in stop_ids:
                    finished[row] = True
                    continue
                new_tokens[row].append(token_id)
                if on_token is not None and on_token(row, token_id):
                    finished[row] = True
            if all(finished) or i == max_new_tokens - 1:
                break
            logits = step(model, token[:, None], (lengths + i)[:, None], longest + i)
    return new_tokens


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    num_samples: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    on_token: TokenCallback | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> list[str]:
    """`num_samples` completions of `prompt` (the new text only). An empty prompt starts from BOS alone."""
    if num_samples < 1:
        raise MiniLlamaError(f"num_samples is {num_samples}; expected at least 1")
    device = model.tok_embeddings.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    new = generate_tokens(
        model, [prompt_ids] * num_samples, max_new_tokens, temperature, top_k, top_p, generator,
        stop_ids=document_end_ids(tokenizer) if stop_at_eos else (), cuda_graph=cuda_graph, on_token=on_token,
        compile=compile,
    )
    return [completion_text(tokenizer, prompt_ids, ids) for ids in new]


def document_end_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The tokens that end a document for a model: BOS, which training puts between documents (so a model ends one
    by starting the next, and run.c stops there too), and EOS, for models trained with it."""
    return tokenizer.bos_id, tokenizer.eos_id
