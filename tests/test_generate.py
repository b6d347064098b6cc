import io
import sys

import pytest
import torch
from conftest import byte_spelled_completions

from minillama.checkpoint import save_checkpoint
from minillama.cli import main
from minillama.config import ModelConfig
from minillama.errors import MiniLlamaError
from minillama.generate import generate, generate_tokens
from minillama.inference.cache import CachedPass, KVCache
from minillama.inference.engine import _static_decoders
from minillama.inference.sampling import SamplingParams, choose_tokens
from minillama.model import Transformer


def greedy_by_rerunning(model, prompt, steps):
    """Reference: run the whole sequence through the plain causal forward for every new token."""
    sequence, logits_per_step = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([sequence]))[0][0, -1]
            logits_per_step.append(logits)
            sequence.append(int(logits.argmax()))
    return sequence[len(prompt):], logits_per_step


def test_cached_greedy_equals_rerunning_the_sequence(model):
    prompt = [1, 17, 42, 99, 5, 250]
    expected, expected_logits = greedy_by_rerunning(model, prompt, 50)
    assert generate_tokens(model, [prompt], 50, temperature=0) == [expected]

    # The cache itself, step by step: prefill, then one token at a time.
    config = model.config
    cache = KVCache(config, 1, len(prompt) + 50, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        prefill = CachedPass.starting_at(cache, slice(0, 1), [0], len(prompt))
        logits = model(torch.tensor([prompt]), cache=prefill)[0][0, -1]
        for i, token in enumerate(expected):
            assert (logits - expected_logits[i]).abs().max() < 1e-4
            step = CachedPass.starting_at(cache, slice(0, 1), [len(prompt) + i], 1)
            logits = model(torch.tensor([[token]]), cache=step)[0][0, -1]
    assert cache.keys.shape[2] == config.kv_heads < config.n_heads  # the cache holds kv heads only


def test_eager_decoding_of_100_tokens_gives_the_plain_forwards_tokens(model):
    """The eager decode step attends over exactly its filled slots on a CPU (in blocks of 64 on CUDA, the empty
    ones masked); over 100 steps, past a block boundary, its tokens equal the plain causal forward's."""
    prompt = [1, 17, 42]
    assert generate_tokens(model, [prompt], 100, temperature=0) == [greedy_by_rerunning(model, prompt, 100)[0]]


def test_mask_free_attention_equals_the_masked_path(model):
    """Rows whose tokens fill the last attended positions (`aligned`) prefill with plain causal attention and
    decode with none; the explicit mask, built as for rows at different positions, gives the same logits."""
    tokens, positions = torch.tensor([[1, 5, 6, 7], [1, 9, 8, 7]]), torch.arange(4).expand(2, 4)
    logits = {}
    with torch.no_grad():
        for aligned in (True, False):
            cache = KVCache(model.config, 2, 8, torch.device("cpu"), torch.float32)
            prefill = model(tokens, cache=CachedPass(cache, slice(0, 2), positions, 4, aligned))[0]
            step = model(torch.tensor([[3], [4]]), cache=CachedPass(cache, slice(0, 2), torch.tensor([[4], [4]]), 5, aligned))[0]
            logits[aligned] = torch.cat([prefill, step], dim=1)
    assert (logits[True] - logits[False]).abs().max() < 1e-5
    assert (logits[True][0, :4] - model(tokens[:1])[0][0]).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(model):
    prompts = [[1, 5, 6, 7, 8], [1, 44]]
    eager = generate_tokens(model, prompts, 20, temperature=0)
    assert generate_tokens(model, prompts, 20, temperature=0, compile=True) == eager
    assert eager[1] == greedy_by_rerunning(model, prompts[1], 20)[0]


def test_batch_of_different_lengths_equals_each_prompt_alone(model):
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 44], [1, 3, 4, 5, 300], [1]]
    batched = generate_tokens(model, prompts, 30, temperature=0)
    assert batched == [generate_tokens(model, [p], 30, temperature=0)[0] for p in prompts]
    assert batched[1] == greedy_by_rerunning(model, prompts[1], 30)[0]


def test_rows_stop_at_eos_independently(model):
    prompts = [[1, 5, 6], [1, 77]]
    free = generate_tokens(model, prompts, 40, temperature=0)
    eos = free[0][3]
    stopped = generate_tokens(model, prompts, 40, temperature=0, stop_ids=[eos])
    for row, tokens in enumerate(free):
        expected = tokens[: tokens.index(eos)] if eos in tokens else tokens
        assert stopped[row] == expected


def test_static_decode_step_equals_eager_on_rows_at_different_positions_and_when_reused(model):
    """The static-shape step (what a CUDA graph captures; on the CPU it runs eagerly) attends over every position
    of a reused cache. Its tokens equal eager decoding's, also for a second batch of other lengths that reuses the
    step, whose stale positions from the first batch must stay invisible."""
    first = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 44], [1, 3, 4, 5, 300]]
    second = [[1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 99, 98]]
    for prompts in (first, second, first):
        static = generate_tokens(model, prompts, 40, temperature=0, cuda_graph=True)
        assert static == generate_tokens(model, prompts, 40, temperature=0, cuda_graph=False)
    assert static[1] == greedy_by_rerunning(model, first[1], 40)[0]
    reused = _static_decoders[model]
    assert len(reused) == 1  # one cache of 3 rows x 256 positions served all three batches


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    def sampled(seed):
        return generate_tokens(model, [[1, 2, 3]] * 3, 20, temperature=1.0, top_k=50, seed=seed)

    assert sampled(7) == sampled(7) and sampled(7) != sampled(8)
    greedy = generate_tokens(model, [[1, 2, 3]], 20, temperature=0)
    assert generate_tokens(model, [[1, 2, 3]], 20, temperature=1.3, top_k=1, seed=0) == greedy
    assert generate_tokens(model, [[1, 2, 3]], 20, temperature=1e-45, seed=0) == greedy  # tiny: greedy, never NaN


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().repeat(400, 1)
    uniforms = torch.rand(400, generator=torch.Generator().manual_seed(0))

    def support(top_p, top_k=None):
        return set(choose_tokens(logits, [SamplingParams(1.0, top_k, top_p)] * 400, uniforms).tolist())

    assert support(0.45) == {1}  # 0.5 alone reaches it
    assert support(0.55) == {1, 3}
    assert support(0.79) == {1, 3}  # 0.5 + 0.3
    assert support(0.81) == {1, 3, 2}
    assert support(1.0) == {0, 1, 2, 3}
    assert support(0.99, top_k=2) == {1, 3}  # top-k then top-p


def test_sampling_draws_each_token_as_often_as_its_probability():
    """Inverse-transform sampling with uniform numbers: frequencies within 4 standard deviations of p."""
    probs = torch.tensor([0.1, 0.6, 0.05, 0.25])
    draws = choose_tokens(probs.log().repeat(20_000, 1), [SamplingParams(1.0)] * 20_000,
                          torch.rand(20_000, generator=torch.Generator().manual_seed(1)))
    frequencies = torch.bincount(draws, minlength=4) / 20_000
    assert ((frequencies - probs).abs() < 4 * (probs * (1 - probs) / 20_000).sqrt()).all()


def test_empty_prompt_starts_from_bos(model, tokenizer):
    text = generate(model, tokenizer, "", num_samples=1, max_new_tokens=8, temperature=0)[0]
    assert text == tokenizer.decode(generate_tokens(model, [[tokenizer.bos_id]], 8, temperature=0)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 200}, "at most 122 new tokens fit"),
        ({"temperature": -1.0}, "temperature is -1.0"),
        ({"top_k": -1}, "top_k is -1"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, message):
    with pytest.raises(MiniLlamaError, match=message):
        generate_tokens(model, [[1, 2, 3, 4, 5, 6]], **{"max_new_tokens": 5, **kwargs})


def test_cli_labels_several_samples_and_streams_one_as_plain_text(tmp_path, model, tokenizer, capsys, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    base = ["generate", str(tmp_path / "ckpt"), "The cat", "--max-new-tokens", "12", "--seed", "3"]
    assert main(base + ["--num-samples", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Sample")]
    assert lines == [f"Sample {i}: The cat{text}" for i, text in enumerate(generate(model, tokenizer, "The cat", 3, 12, seed=3))]
    assert main(base + ["--num-samples", "1", "--temperature", "0"]) == 0
    expected = generate(model, tokenizer, "The cat", num_samples=1, max_new_tokens=12, temperature=0)[0]
    assert capsys.readouterr().out == f"The cat{expected}\n"  # one sample: no label, as a pipe wants it
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"The cat\n\n  \nA dog\n")))
    assert main(base[:2] + ["--interactive", "--num-samples", "1", "--max-new-tokens", "3", "--seed", "7"]) == 0
    out, err = capsys.readouterr()
    first, second = (generate(model, tokenizer, prompt, 1, 3, seed=seed)[0] for prompt, seed in (("The cat", 7), ("A dog", 8)))
    assert out == f"The cat{first}\nA dog{second}\n"  # blank lines asked nothing and used no seed
    assert "Type a prompt" not in err  # prompts from a pipe get no banner


def test_cli_stop_ends_a_sample_before_the_text(tmp_path, model, tokenizer, capsys):
    """--stop cuts each sample before the first occurrence of the text, as the server's `stop` does."""
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    full = generate(model, tokenizer, "The cat", num_samples=1, max_new_tokens=30, temperature=0, stop_at_eos=False)[0]
    cut = next(piece for piece in (full[i:i + 2] for i in range(3, len(full) - 1)) if piece.strip())
    assert main(["generate", str(tmp_path / "ckpt"), "The cat", "--max-new-tokens", "30", "--temperature", "0",
                 "--num-samples", "1", "--no-stop-at-eos", "--stop", cut]) == 0
    assert capsys.readouterr().out == "The cat" + full[:full.index(cut)] + "\n"
    assert main(["generate", str(tmp_path / "ckpt"), "The cat", "--stop", ""]) == 2


@pytest.mark.slow
def test_cli_stream_prints_characters_spelled_in_byte_tokens_whole(stories, capsys):
    """A character spelled in byte-fallback tokens is printed once its last byte arrives, not as U+FFFD."""
    from minillama.checkpoint import load_for_inference

    model, tokenizer, _ = load_for_inference(stories, "cpu", "float32")
    cases = byte_spelled_completions(model, tokenizer, "Once upon a time", range(4))
    assert len(cases) >= 2
    for seed, expected in cases:
        assert main(["generate", str(stories), "Once upon a time", "--num-samples", "1", "--max-new-tokens", "48",
                     "--temperature", "1", "--top-k", "0", "--seed", str(seed), "--device", "cpu"]) == 0
        assert capsys.readouterr().out == f"Once upon a time{expected}\n"


def test_cli_refuses_a_tokenizer_with_another_vocab(tmp_path, tokenizer, capsys):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=16, max_seq_len=32))
    save_checkpoint(tmp_path / "ckpt", model)
    assert main(["generate", str(tmp_path / "ckpt"), "hi", "--tokenizer", str(tokenizer.path)]) == 2
    err = capsys.readouterr().err
    assert "has vocab 320, checkpoint" in err and "has 512" in err


def test_top_k_zero_means_no_cut(model):
    def sampled(top_k):
        return generate_tokens(model, [[1, 2, 3]] * 2, 20, temperature=1.0, top_k=top_k, seed=5)

    assert sampled(0) == sampled(None) != sampled(2)


def test_cli_interactive_prompts_get_successive_seeds_and_long_prompts_fail_before_printing(tmp_path, model, tokenizer, capsys,
                                                                                             monkeypatch):
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    base = ["generate", str(tmp_path / "ckpt"), "--num-samples", "1", "--max-new-tokens", "10"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"The cat\nThe cat\n")))  # as a terminal's lines arrive
    assert main(base + ["--interactive", "--seed", "7"]) == 0
    out, err = capsys.readouterr()
    first, second = out.splitlines()
    assert first == "The cat" + generate(model, tokenizer, "The cat", 1, 10, seed=7)[0]
    assert second == "The cat" + generate(model, tokenizer, "The cat", 1, 10, seed=8)[0] != first
    assert f"using {tmp_path / 'ckpt'}" in err
    assert main(base[:2] + ["word " * 200] + base[2:]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "too many for the model's max_seq_len of 128" in err
