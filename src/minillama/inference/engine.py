"""The inference engine: continuous batching over a KV cache of rows (slots), for `generate`, the harness's
generation and the server.

Design:
- Each running completion owns one row of the cache. Every `step` first extends all running rows by one token
  in a single forward pass (decode), each row at its own position, then lets waiting requests join: their
  prompts run through the model together (prefill, right-padded, plain causal attention), straight into the
  rows that are free, and their first tokens are chosen. A request thus starts at the next step, whatever the
  others are doing, and a finished row is free at once (continuous batching, as vLLM and llama.cpp's parallel
  slots do). Running rows are kept in rows 0..B-1: a row that leaves is replaced by the last one.
- A request with n > 1 runs its prompt once; its other completions start from a copy of that row (those that
  find no free row wait, and run the prompt again when they start).
- Each completion samples with its own settings and its own random stream (seed + its index), so its tokens
  do not depend on what else is in the batch. Stop tokens end it (not included); stop strings end its text,
  held back in one place (`TextStream`) with incomplete UTF-8 characters.
- Log-probabilities are those of the model's own distribution (before temperature and cuts), for each new
  token (a stop token included, though it adds no text) and, on request, each prompt token (echo), with up to
  `MAX_LOGPROBS` alternatives.
- On CUDA the decode step runs at fixed shapes over all rows, captured once as a CUDA graph and replayed
  (`StaticDecoder`; kept for later engines of the same shape); elsewhere it runs eagerly over the running rows
  and the positions they fill.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from minillama.errors import ArgumentError, MiniLlamaError
from minillama.inference.cache import CachedPass, KVCache, right_padded
from minillama.inference.sampling import SamplingParams, choose_tokens, nth_seed
from minillama.inference.scoring import Scores, TokenLogprobs, score_targets
from minillama.inference.text import TextStream
from minillama.model import Transformer, compute_dtype, evaluating
from minillama.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # alternatives per position an engine gives (the server allows OpenAI's 5)
_EAGER_ATTEND_ROUNDING = 64  # on CUDA, eager decoding attends over a multiple of this: fewer shapes to plan kernels for
_STATIC_CACHE_ROUNDING = 256  # static caches come in lengths of 256, 512, ... so that similar requests share one


@dataclass(frozen=True)
class Request:
    """A prompt (token ids) and what to do with it."""

    prompt: Sequence[int]
    max_tokens: int  # new tokens at most; 0 only scores the prompt
    sampling: SamplingParams = SamplingParams()
    n: int = 1  # completions of this prompt; the i-th samples with seed + i
    stop: tuple[str, ...] = ()  # texts that end a completion, not part of it (needs the engine's tokenizer)
    stop_ids: frozenset[int] = frozenset()  # tokens that end a completion, not part of it
    logprobs: int | None = None  # each new token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens


class Completion:
    """One of a request's completions as it grows: its tokens, the text released so far (final, see
    `TextStream`), log-probabilities, and why it finished. Cancelling frees its row at the next step."""

    def __init__(self, request: Request, index: int, tokenizer: Tokenizer | None):
        self.request, self.index = request, index
        seed = request.sampling.seed
        self.sampling = request.sampling if seed is None else dataclasses.replace(request.sampling, seed=nth_seed(seed, index))
        self.random = self.sampling.random_stream()
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs] | None = None
        self.finish_reason: str | None = None  # "stop" or "length"
        self.cancelled = False
        self._text = TextStream(tokenizer, request.prompt, request.stop) if tokenizer is not None else None
        self.length = 0  # positions of its cache row that hold its sequence
        self.pending = 0  # its newest token, chosen but not yet run through the model

    @property
    def text(self) -> str:
        return self._text.text if self._text is not None else ""

    def uniform(self) -> float:
        return 0.0 if self.sampling.greedy else torch.rand((), generator=self.random).item()


@dataclass
class Update:
    """What one step added to one completion: text that became final, the token (None when none was added: a
    stop token, or a prompt scored only) and the chosen token's log-probabilities, the finish reason, and how many
    of the completion's tokens came before this step's (a reader on another thread may see later steps' tokens
    already appended)."""

    completion: Completion
    text: str
    token: int | None
    logprobs: TokenLogprobs | None
    finish_reason: str | None
    position: int


class Engine:
    """Runs requests on `model`, `rows` completions at a time; requests wait in order for rows to free up.

    One thread drives it: `submit` requests, then call `step` (or iterate `run`) until they finish.
    `cuda_graph` (default: on for CUDA models outside autocast) decodes at fixed shapes, captured as a CUDA graph on
    CUDA and run eagerly elsewhere; a graph needs the weights in the compute dtype, so autocast refuses it.
    `compile` compiles that fixed-shape step with torch.compile.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, *, rows: int = 8, max_len: int | None = None,
                 cuda_graph: bool | None = None, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.tok_embeddings.weight.device
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        autocasting = torch.is_autocast_enabled(self.device.type)
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda" and not autocasting
        elif cuda_graph and autocasting:
            raise MiniLlamaError("cuda_graph=True under autocast: cast the model to the compute dtype instead, or pass cuda_graph=False")
        self.static: StaticDecoder | None = None
        if cuda_graph or compile:
            self.max_len = min(model.config.max_seq_len, -(-self.max_len // _STATIC_CACHE_ROUNDING) * _STATIC_CACHE_ROUNDING)
            self.static = static_decoder(model, rows, self.max_len, compile=compile, graph=cuda_graph and self.device.type == "cuda")
            self.cache = self.static.cache
        else:
            self.cache = KVCache(model.config, rows, self.max_len, self.device, compute_dtype(model))
        self.waiting: collections.deque[list[Completion]] = collections.deque()
        self.running: list[Completion] = []  # running[i] owns cache row i
        self.joining: list[list[Completion]] = []  # taken from `waiting` by the step in progress

    @property
    def rows(self) -> int:
        return self.cache.rows

    def submit(self, request: Request) -> list[Completion]:
        """Queue `request`; its completions, which fill in as steps run. Refuses what could never run."""
        self.check(request)
        completions = [Completion(request, i, self.tokenizer) for i in range(request.n)]
        self.waiting.append(completions)
        return completions

    def check(self, request: Request) -> None:
        vocab = self.model.config.vocab_size
        if not request.prompt:
            raise MiniLlamaError("a prompt has no tokens; start it with BOS at least")
        bad = outside_vocabulary(request.prompt, vocab)
        if bad is not None:
            raise MiniLlamaError(f"the prompt holds token id {bad}; expected ids from 0 to {vocab - 1}")
        check_length(self.max_len, len(request.prompt), request.max_tokens)
        if request.n < 1:
            raise MiniLlamaError(f"n is {request.n}; expected at least 1 completion per prompt")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise MiniLlamaError(f"{name} is {value}; expected from 0 to {MAX_LOGPROBS}")
        if request.stop and self.tokenizer is None:
            raise MiniLlamaError("stop strings need the engine's tokenizer to read the text")

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> Iterator[Update]:
        """Step until every submitted request has finished, yielding each step's updates."""
        while self.busy:
            yield from self.step()

    @torch.no_grad()
    def step(self) -> list[Update]:
        """One token for every running completion, then the waiting requests that fit join with their first."""
        for completion in [c for c in self.running if c.cancelled]:
            self._release(completion)
        updates = []
        # Eval mode (no dropout) for the step; switching costs a walk over every module, so only when needed.
        with evaluating(self.model) if self.model.training else contextlib.nullcontext():
            if self.running:
                running = list(self.running)
                logits = self._decode(running)
                updates += self._advance(running, logits)
            updates += self._admit()
        for update in updates:
            if update.finish_reason is not None:
                self._release(update.completion)
        return updates

    def _decode(self, running: list[Completion]) -> Tensor:
        tokens = [c.pending for c in running]
        starts = [c.length for c in running]
        for completion in running:
            completion.length += 1
        if self.static is not None:
            return self.static(self.model, tokens, starts)[: len(running)]
        round_to = _EAGER_ATTEND_ROUNDING if self.device.type == "cuda" else 1
        call = CachedPass.starting_at(self.cache, slice(0, len(running)), starts, 1, round_to=round_to)
        token_ids = torch.tensor(tokens, device=self.device)[:, None]
        return self.model.output(self.model.hidden_states(token_ids, call)[:, -1])

    def _admit(self) -> list[Update]:
        """Prefill the waiting requests that fit in the free rows, in order, and choose their first tokens."""
        joining = self.joining = []
        free = self.rows - len(self.running)
        while self.waiting and free:
            group = [c for c in self.waiting.popleft() if not c.cancelled]
            if len(group) > free:  # what does not fit waits at the front, and runs its prompt again when it starts
                self.waiting.appendleft(group[free:])
                group = group[:free]
            if group:
                joining.append(group)
                free -= len(group)
        if not joining:
            return []
        prompts = [list(group[0].request.prompt) for group in joining]
        width, first = max(map(len, prompts)), len(self.running)
        call = CachedPass.starting_at(self.cache, slice(first, first + len(prompts)), [0] * len(prompts), width)
        states = self.model.hidden_states(right_padded(prompts, width).to(self.device), call)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        logits = self.model.output(states[torch.arange(len(prompts), device=self.device), lengths - 1])

        for row, group in enumerate(joining):
            prompt, top = prompts[row], group[0].request.prompt_logprobs
            if top is not None:
                scores = score_targets(self.model, states[row, : len(prompt) - 1], torch.tensor(prompt[1:], device=self.device), top)
                for completion in group:
                    completion.prompt_logprobs = [TokenLogprobs(prompt[0], None, ()), *scores.entries(prompt[1:])]
            for completion in group:
                completion.length = len(prompt)
        for row, group in enumerate(joining):  # each request's first completion in the row its prompt went to
            self.running.append(group[0])
        for row, group in enumerate(joining):  # the others start from a copy of it
            for completion in group[1:]:
                self.cache.copy_row(first + row, len(self.running), len(prompts[row]))
                self.running.append(completion)
        self.joining = []
        members = [c for group in joining for c in group]
        owners = torch.tensor([row for row, group in enumerate(joining) for _ in group], device=self.device)
        updates = [self._finish(c, c._text.finish() if c._text else "", None, None, "length") for c in members if c.request.max_tokens == 0]
        sampling = [c for c in members if c.request.max_tokens > 0]
        if sampling:
            keep = torch.tensor([c.request.max_tokens > 0 for c in members], device=self.device)
            updates += self._advance(sampling, logits[owners[keep]])
        return updates

    def _advance(self, completions: list[Completion], logits: Tensor) -> list[Update]:
        """Choose each completion's next token from its row of `logits` and take it (or end there)."""
        uniforms = torch.tensor([c.uniform() for c in completions])
        tokens = choose_tokens(logits, [c.sampling for c in completions], uniforms)
        chosen = tokens.tolist()
        wanted = [c.request.logprobs for c in completions if c.request.logprobs is not None]
        entries: list[TokenLogprobs | None] = [None] * len(completions)
        if wanted:
            entries = Scores.of_logits(logits, tokens, max(wanted)).entries(chosen)
        return [self._take(c, token, entry) for c, token, entry in zip(completions, chosen, entries)]

    def _take(self, completion: Completion, token: int, entry: TokenLogprobs | None) -> Update:
        request, text = completion.request, completion._text
        if entry is not None:  # a stop token too has its log-probability (as vLLM reports it), though no text
            entry = dataclasses.replace(entry, top=entry.top[: request.logprobs])
            completion.logprobs.append(entry)
        if token in request.stop_ids:
            return self._finish(completion, text.finish() if text else "", None, entry, "stop")
        completion.tokens.append(token)
        completion.pending = token
        delta = text.add(token) if text else ""
        if text and text.stopped:
            return self._finish(completion, delta, token, entry, "stop")
        if len(completion.tokens) >= request.max_tokens:
            delta += text.finish() if text else ""  # a stop string completed by held-back bytes still stops it
            return self._finish(completion, delta, token, entry, "stop" if text and text.stopped else "length")
        return Update(completion, delta, token, entry, None, len(completion.tokens) - 1)

    @staticmethod
    def _finish(completion: Completion, text: str, token: int | None, entry: TokenLogprobs | None, reason: str) -> Update:
        completion.finish_reason = reason
        return Update(completion, text, token, entry, reason, len(completion.tokens) - (token is not None))

    def _release(self, completion: Completion) -> None:
        """Free a finished or cancelled completion's row: the last running row moves into it."""
        if completion not in self.running:
            return
        row, last = self.running.index(completion), self.running[-1]
        if last is not completion:
            self.cache.copy_row(len(self.running) - 1, row, last.length)
            self.running[row] = last
        self.running.pop()

    def fail_step(self) -> list[Completion]:
        """After an error inside `step`: drop the completions it was running or admitting (the ones returned);
        the waiting ones stay queued."""
        dropped = self.running + [c for group in self.joining for c in group]
        self.running, self.joining = [], []
        return dropped


def outside_vocabulary(ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id that names no token of a `vocab_size` vocabulary, or None."""
    return next((t for t in ids if not 0 <= t < vocab_size), None)


def check_length(limit: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that leaves no room for `max_new_tokens` within `limit` positions."""
    if max_new_tokens < 0:
        raise ArgumentError("{max_new_tokens} is {value}; expected 0 or more", value=max_new_tokens)
    if prompt_tokens >= limit and max_new_tokens > 0:
        raise ArgumentError("the prompt is {tokens} tokens: {over} too many for the model's max_seq_len of {limit}, which must "
                            "also hold the new tokens; shorten the prompt", tokens=prompt_tokens, over=prompt_tokens - limit + 1,
                            limit=limit)
    if prompt_tokens + max_new_tokens > limit:
        raise ArgumentError("a prompt of {tokens} tokens plus {value} new tokens exceeds the model's max_seq_len of {limit}; "
                            "at most {room} new tokens fit: lower {max_new_tokens}", tokens=prompt_tokens, value=max_new_tokens,
                            limit=limit, room=limit - prompt_tokens)


class StaticDecoder:
    """The decode step at fixed shapes: every row of its cache, every position attended (masked beyond each row's
    own), so that it can be compiled and, on CUDA, captured once as a CUDA graph and replayed, which removes the
    per-kernel launch cost that dominates small-model decoding. A graph reads the weights where they were at
    capture; rows that run nothing decode a dummy token, out of sight of any other row."""

    def __init__(self, model: Transformer, rows: int, max_len: int, compile: bool, graph: bool):
        device, dtype = model.tok_embeddings.weight.device, compute_dtype(model)
        self.cache = KVCache(model.config, rows, max_len, device, dtype)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.step = torch.compile(_decode_logits, dynamic=False) if compile else _decode_logits
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._capture(model)

    def _forward(self, model: Transformer) -> Tensor:
        return self.step(model, self.cache, self.token, self.position)

    def _capture(self, model: Transformer) -> None:
        # Warm up on a side stream (as capture requires; a compiled step compiles here), then record one step.
        # Both write position 0 of every row, which any sequence's prefill overwrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(model)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(model)

    def __call__(self, model: Transformer, tokens: list[int], positions: list[int]) -> Tensor:
        rows = self.cache.rows
        self.token.copy_(torch.tensor(tokens + [0] * (rows - len(tokens)))[:, None])
        self.position.copy_(torch.tensor(positions + [0] * (rows - len(positions)))[:, None])
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._forward(model)


def _decode_logits(model: Transformer, cache: KVCache, token: Tensor, position: Tensor) -> Tensor:
    call = CachedPass(cache, slice(0, cache.rows), position, attend=None)
    return model.output(model.hidden_states(token, call)[:, -1])


# Static decoders of each live model, newest last; a few, since each holds a KV cache (and on CUDA a graph).
_static_decoders: weakref.WeakKeyDictionary[Transformer, dict[tuple, StaticDecoder]] = weakref.WeakKeyDictionary()
_STATIC_DECODERS_PER_MODEL = 2


def static_decoder(model: Transformer, rows: int, max_len: int, compile: bool, graph: bool) -> StaticDecoder:
    """A static decoder for these shapes, reused when its shapes and the weights' addresses match."""
    addresses = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    key = (rows, max_len, compute_dtype(model), compile, graph, addresses)
    decoders = _static_decoders.setdefault(model, {})
    decoder = decoders.pop(key, None)
    if decoder is None:
        while len(decoders) >= _STATIC_DECODERS_PER_MODEL:
            del decoders[next(iter(decoders))]
        decoder = StaticDecoder(model, rows, max_len, compile, graph)
    decoders[key] = decoder
    return decoder
