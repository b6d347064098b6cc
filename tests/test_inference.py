"""The inference engine: continuous batching over cache rows, each completion's own sampling stream, and
log-probabilities, against each request run alone and against the plain causal forward."""

import pytest
import torch

from minillama.errors import MiniLlamaError
from minillama.inference.engine import Engine, Request
from minillama.inference.sampling import SamplingParams


def alone(model, request):
    engine = Engine(model, rows=request.n)
    completions = engine.submit(request)
    list(engine.run())
    return [c.tokens for c in completions]


@pytest.mark.slow
def test_a_request_joining_mid_run_gets_the_tokens_it_gets_alone_and_leaves_its_row_at_once(model):
    first = Request([1, 5, 6, 7], 30, SamplingParams(0))
    short = Request([1, 44, 45], 3, SamplingParams(0))
    later = Request([1, 9], 10, SamplingParams(0))
    engine = Engine(model, rows=2)
    [a] = engine.submit(first)
    for _ in range(5):
        engine.step()
    [b] = engine.submit(short)
    [c] = engine.submit(later)  # no free row until `short` finishes
    started, step = {}, 5
    while engine.busy:
        step += 1
        for update in engine.step():
            started.setdefault(id(update.completion), step)
    assert started[id(b)] == 6 and started[id(c)] == 9  # b took the free row at once; c took b's as b finished
    assert [a.tokens, b.tokens, c.tokens] == [alone(model, r)[0] for r in (first, short, later)]
    assert a.finish_reason == b.finish_reason == c.finish_reason == "length"


def test_a_completions_samples_depend_on_its_seed_only_not_on_what_shares_the_batch(model):
    request = Request([1, 2, 3], 25, SamplingParams(1.0, top_k=20, seed=11))
    engine = Engine(model, rows=4)
    engine.submit(Request([1, 7], 40, SamplingParams(0.7, seed=1)))
    [mine] = engine.submit(request)
    engine.submit(Request([1, 8, 9, 10, 11], 5, SamplingParams(1.3, top_p=0.5)))
    list(engine.run())
    assert mine.tokens == alone(model, request)[0]


def test_n_completions_share_one_prefill_and_are_the_requests_seeded_seed_plus_i(model):
    many = alone(model, Request([1, 2, 3], 15, SamplingParams(1.0, seed=100), n=3))
    assert many == [alone(model, Request([1, 2, 3], 15, SamplingParams(1.0, seed=100 + i)))[0] for i in range(3)]
    assert len({tuple(t) for t in many}) == 3
    engine = Engine(model, rows=2)  # n larger than the rows: the rest wait and start when rows free up
    completions = engine.submit(Request([1, 2, 3], 15, SamplingParams(1.0, seed=100), n=3))
    list(engine.run())
    assert [c.tokens for c in completions] == many


def test_logprobs_of_prompt_and_new_tokens_are_the_plain_forwards(model):
    prompt = [1, 17, 42, 99, 5]
    engine = Engine(model, rows=1)
    [completion] = engine.submit(Request(prompt, 6, SamplingParams(0.9, seed=4), logprobs=3, prompt_logprobs=2))
    list(engine.run())
    sequence = prompt + completion.tokens
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(torch.tensor([sequence]))[0][0], dim=-1)
    entries = completion.prompt_logprobs + completion.logprobs
    assert entries[0].logprob is None and [e.token for e in entries] == sequence
    for position, entry in enumerate(entries[1:], start=1):
        row = log_softmax[position - 1]
        assert abs(entry.logprob - float(row[sequence[position]])) < 1e-4
        top = row.topk(len(entry.top))
        assert [t for t, _ in entry.top] == top.indices.tolist() and len(entry.top) == (2 if position < len(prompt) else 3)


def test_a_cancelled_completion_frees_its_row_for_the_next_request(model):
    engine = Engine(model, rows=1)
    [long] = engine.submit(Request([1, 2], 100, SamplingParams(0)))
    [waiting] = engine.submit(Request([1, 3], 4, SamplingParams(0)))
    engine.step()
    long.cancelled = True
    updates = engine.step()
    assert [u.completion for u in updates] == [waiting] and long.finish_reason is None


@pytest.mark.parametrize("request_, message", [
    (Request([], 4), "a prompt has no tokens"),
    (Request([1, 320], 4), "the prompt holds token id 320; expected ids from 0 to 319"),
    (Request([1, 2], 127), "exceeds the model's max_seq_len of 128; at most 126 new tokens fit"),
    (Request([1, 2], 4, logprobs=21), "logprobs is 21; expected from 0 to 20"),
    (Request([1, 2], 4, stop=("x",)), "stop strings need the engine's tokenizer"),
])
def test_requests_that_could_never_run_are_refused_at_submit(model, request_, message):
    with pytest.raises(MiniLlamaError, match=message):
        Engine(model).submit(request_)
