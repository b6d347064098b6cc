"""GGUF export, proven in llama.cpp itself (through llama-cpp-python): same tokenization, same greedy tokens, same
logits, and q8_0's cost measured."""

import importlib.util
import re

import llama_cpp_child
import numpy as np
import pytest
import torch
from conftest import data_file
from llama_cpp_child import in_child

from minillama.checkpoint import load_checkpoint, load_checkpoint_tokenizer
from minillama.cli import main
from minillama.generate import generate, generate_tokens
from minillama.interop.llamacpp import export_gguf, gguf_name

if importlib.util.find_spec("llama_cpp") is None:  # found, not imported: llama.cpp's native code runs in child processes only
    pytest.skip("needs llama-cpp-python: pip install -r requirements-dev.txt (builds it for any x86-64 CPU)", allow_module_level=True)
gguf = pytest.importorskip("gguf", reason="needs the 'gguf' extra")

PROMPTS = ["Once upon a time", "The little dog", "She said: \"Hello", "One day, Lily and Tom went to the park and"]
GREEDY_STEPS = 30
PORTABLE_X86 = {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"}  # requirements-dev.txt's baseline
F16_ROUNDOFF = 2.0**-11  # float16's unit roundoff: half of its 10-bit mantissa's last place


def rounded_to_f16(model):
    """The model as an f16 GGUF file holds it: matrices rounded to float16, norms kept; computed in float32."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
    return model


def f16_logit_tolerance(n_layers: int, logits: np.ndarray) -> float:
    """How far llama.cpp's logits of an f16 file may sit from the same f16-rounded weights computed in float32.
    Both hold identical weights; llama.cpp also rounds every matmul's input activations to float16 (its f16 dot
    product takes f16 on both sides), a relative error of at most F16_ROUNDOFF per input. Each block rounds four
    inputs (attention in, attention out, MLP in, MLP hidden) and the head one, and to first order these errors add:
    (4 * n_layers + 1) * F16_ROUNDOFF of the logits' scale, on any CPU and thread count."""
    return (4 * n_layers + 1) * F16_ROUNDOFF * max(1.0, float(np.abs(logits).max()))


def our_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Mini Llama's greedy tokens and, for each, the logits it was chosen from (the sequence re-read in one pass)."""
    tokens = generate_tokens(model.eval(), [prompt], steps, temperature=0)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0][0, len(prompt) - 1: len(prompt) + steps - 1]
    return tokens, logits.numpy()


def assert_greedy_agrees(ours: tuple[list[int], np.ndarray], theirs: tuple[list[int], np.ndarray], tolerance: float,
                         label: str) -> None:
    """llama.cpp's greedy tokens equal Mini Llama's, and the logits they come from agree within `tolerance`, up to the
    first step where the two choose differently; there the choice must have been a near-tie (Mini Llama's top two
    logits closer than the two sides may differ, 2 * tolerance). From there the prefixes differ and so may the rest."""
    (our_tokens, our_logits), (their_tokens, their_logits) = ours, theirs
    for step, (ours_id, theirs_id) in enumerate(zip(our_tokens, their_tokens)):
        difference = float(np.abs(our_logits[step] - their_logits[step]).max())
        assert difference <= tolerance, f"{label}: step {step}: logits differ by {difference:.3g} > {tolerance:.3g}"
        if ours_id != theirs_id:
            top_two = np.sort(our_logits[step])[-2:]
            gap = float(top_two[1] - top_two[0])
            assert gap <= 2 * tolerance, (f"{label}: step {step}: llama.cpp chose {theirs_id}, Mini Llama {ours_id}, "
                                          f"though the top two logits are {gap:.3g} apart (> {2 * tolerance:.3g})")
            return


def test_llama_cpp_is_the_portable_build():
    """requirements-dev.txt builds llama.cpp for any x86-64 CPU: its own system info names no instruction set
    beyond the AVX2 baseline (a native build on an AVX-512/AMX CPU names AVX512 or AMX_INT8, and its q8_0 kernels
    crash where the AMX tiles cannot be used)."""
    info = in_child(llama_cpp_child.system_info)
    enabled = set(re.findall(r"(\w+) = 1", info))
    if "AVX" not in enabled:
        pytest.skip(f"not an x86-64 build of llama.cpp: {info.strip()}")
    beyond = sorted(name for name in enabled if re.fullmatch(r"AVX\w*|AMX\w*|SSE\w*|F16C|FMA|BMI2", name)
                    and name not in PORTABLE_X86)
    assert not beyond, (f"llama.cpp was built with {', '.join(beyond)}: a native build (pip's wheel cache may hold one); "
                        "reinstall: pip install --force-reinstall --no-deps --no-cache-dir -r requirements-dev.txt")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_llama_cpp_tokenizes_as_sentencepiece_and_decodes_greedily_as_mini_llama(which, request, tmp_path):
    """f32: the same tokens exactly and logits within float32's summation-order error. f16: the same tokens up to
    the first near-tie, logits within f16_logit_tolerance (llama.cpp rounds activations to f16; Mini Llama is given
    the same f16-rounded weights)."""
    checkpoint = request.getfixturevalue(which)
    model, info = load_checkpoint(checkpoint)
    tokenizer = load_checkpoint_tokenizer(info)
    texts = PROMPTS + ["digits 1234 and ünïcödé, tabs\tand\nnew lines", "ROMEO: Wherefore art thou?"]
    prompts = [tokenizer.encode(prompt) for prompt in PROMPTS]
    for dtype in ("f32", "f16"):
        out, fell_back = export_gguf(checkpoint, tmp_path / f"{dtype}.gguf", dtype)
        assert fell_back == []
        assert in_child(llama_cpp_child.tokenize, str(out), texts) == [tokenizer.encode(text) for text in texts], dtype
        reference = model if dtype == "f32" else rounded_to_f16(load_checkpoint(checkpoint)[0])
        theirs = in_child(llama_cpp_child.greedy, str(out), prompts, GREEDY_STEPS)
        for prompt, ids, their_greedy in zip(PROMPTS, prompts, theirs):
            ours = our_greedy(reference, ids, GREEDY_STEPS)
            if dtype == "f32":
                assert their_greedy[0] == ours[0], (dtype, prompt)
                assert_greedy_agrees(ours, their_greedy, f32_logit_tolerance(ours[1]), f"f32 {prompt!r}")
            else:
                tolerance = f16_logit_tolerance(model.config.n_layers, ours[1])
                assert_greedy_agrees(ours, their_greedy, tolerance, f"f16 {prompt!r}")


def f32_logit_tolerance(logits: np.ndarray) -> float:
    """float32 on both sides; what differs is the order of summation inside matmuls (llama.cpp's blocked kernels vs
    torch's), worth ~1e-6 relative per op and compounding over a few layers: 1e-4 absolute on logits of magnitude
    ~10 allows that and nothing more (a wrong rotary layout or norm is off by whole units)."""
    return 1e-4 * max(1.0, float(np.abs(logits).max()) / 10)


def test_f32_logits_of_a_64_token_sequence_agree(stories, tmp_path):
    model, info = load_checkpoint(stories)
    out, _ = export_gguf(stories, tmp_path / "m.gguf", "f32")
    ids = load_checkpoint_tokenizer(info).encode("Once upon a time, there was a little girl named Lily. She loved to play outside "
                                                 "with her ball and her dog. One day, her mom said she could go to the park "
                                                 "with her friend Tom. They ran and jumped and laughed all day long.")[:64]
    assert len(ids) == 64
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))[0][0].numpy()
    theirs = in_child(llama_cpp_child.sequence_logits, str(out), ids)
    assert np.abs(ours - theirs).max() < f32_logit_tolerance(ours)


def test_a_wrong_layout_fails_the_comparison_with_llama_cpp(stories, tmp_path, monkeypatch):
    """The comparisons above can fail: an export that writes wq's rows in Hugging Face's rotary order (a real mistake
    a converter makes) gives llama.cpp a different model, and both the f32 logits and the greedy check say so."""
    from minillama.interop import llamacpp
    from minillama.interop.rotary import interleaved_to_halves

    model, info = load_checkpoint(stories)
    original = llamacpp.model_state_dict

    def halves_layout(model_to_export):
        state = original(model_to_export)
        for name in [n for n in state if n.endswith("attention.wq.weight")]:
            state[name] = interleaved_to_halves(state[name], model.config.n_heads)
        return state

    monkeypatch.setattr(llamacpp, "model_state_dict", halves_layout)
    out, _ = export_gguf(stories, tmp_path / "wrong.gguf", "f32")
    prompt = load_checkpoint_tokenizer(info).encode(PROMPTS[3])
    ours = our_greedy(model, prompt, GREEDY_STEPS)
    theirs = in_child(llama_cpp_child.greedy, str(out), [prompt], GREEDY_STEPS)[0]
    with pytest.raises(AssertionError, match="logits differ"):
        assert_greedy_agrees(ours, theirs, f32_logit_tolerance(ours[1]), "wrong layout")
    with pytest.raises(AssertionError, match="logits differ"):
        assert_greedy_agrees(ours, theirs, f16_logit_tolerance(model.config.n_layers, ours[1]), "wrong layout")


@pytest.mark.slow
def test_q8_0_keeps_top1_and_perplexity_and_names_what_it_cannot_quantize(stories, tiny, test_data, tmp_path, capsys):
    """q8_0 rounds each block of 32 weights to 8 bits (and llama.cpp the activations too): not equal, but close
    enough that over 256 tokens the argmax agrees at > 95% of positions and perplexity moves < 2%."""
    assert main(["export", "gguf", str(stories), str(tmp_path / "s.gguf"), "--dtype", "q8_0"]) == 0
    note = capsys.readouterr().err
    assert "5 matrices have rows that are not a multiple of 32" in note and "layers.0.feed_forward.w2.weight" in note
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds[gguf_name("layers.0.feed_forward.w2.weight")] == "F16" and kinds["blk.0.attn_q.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in kinds  # the tied head is stored once

    model, info = load_checkpoint(tiny)
    out, fell_back = export_gguf(tiny, tmp_path / "t.gguf", "q8_0")
    assert fell_back == []
    text = data_file(test_data, "tinyshakespeare.txt").read_text()[-3000:]
    ids = load_checkpoint_tokenizer(info).encode(text)[:256]
    theirs = torch.tensor(in_child(llama_cpp_child.sequence_logits, str(out), ids))
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))[0][0]
    targets = torch.tensor(ids[1:])
    agreement = (theirs[:-1].argmax(-1) == ours[:-1].argmax(-1)).float().mean().item()
    ppl_ours = torch.nn.functional.cross_entropy(ours[:-1], targets).exp().item()
    ppl_theirs = torch.nn.functional.cross_entropy(theirs[:-1], targets).exp().item()
    print(f"q8_0 on tiny shakespeare ({len(ids)} tokens): top-1 agreement {agreement:.4f}, perplexity {ppl_ours:.4f} -> {ppl_theirs:.4f}")
    assert agreement > 0.95 and abs(ppl_theirs / ppl_ours - 1) < 0.02


def test_llama_cpp_ends_a_completion_where_mini_llama_does_at_bos(stories, tmp_path):
    """stories260K ends a document (BOS) 16 tokens after this prompt; llama.cpp ends generation there too, and
    n_ctx=0 (the README's snippet) gives the model's own context."""
    model, info = load_checkpoint(stories)
    tokenizer = load_checkpoint_tokenizer(info)
    ours = generate(model, tokenizer, "Once upon a time", num_samples=1, max_new_tokens=100, temperature=0, top_k=None)[0]
    out, _ = export_gguf(stories, tmp_path / "m.gguf", "f32")
    n_ctx, finish_reason, text = in_child(llama_cpp_child.completion, str(out), "Once upon a time", 100)
    assert n_ctx == model.config.max_seq_len
    assert finish_reason == "stop" and text == ours


def test_gguf_metadata_describes_the_model(stories, tmp_path):
    out, _ = export_gguf(stories, tmp_path / "m.gguf", "bf16")
    reader = gguf.GGUFReader(out)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama" and field("llama.block_count") == 5
    assert (field("llama.embedding_length"), field("llama.feed_forward_length")) == (64, 172)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (8, 4)
    assert field("llama.rope.dimension_count") == 8 and field("llama.context_length") == 512
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.tokens")) == 512
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"BF16"}


def test_gguf_export_refuses_in_one_line_and_changes_nothing(stories, tmp_path, capsys):
    (tmp_path / "notes.gguf").write_text("mine")
    assert main(["export", "gguf", str(stories), str(tmp_path / "notes.gguf")]) == 2
    assert capsys.readouterr().err == (f"minillama: error: {tmp_path / 'notes.gguf'} already exists; choose a "
                                       "new path for the GGUF file, or pass --force to replace an earlier GGUF file there\n")
    assert main(["export", "gguf", str(stories), str(tmp_path / "notes.gguf"), "--force"]) == 2
    assert "exists and is not a GGUF file" in capsys.readouterr().err
    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf"), "--dtype", "q4_k"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "minillama: error: --dtype q4_k is not supported; choose one of f32, f16, bf16, q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf"] and (tmp_path / "notes.gguf").read_text() == "mine"
    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf")]) == 0
    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf"), "--dtype", "f32", "--force"]) == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 0


def test_export_says_when_llama_cpp_will_tokenize_repeated_spaces_otherwise(stories, test_data, tmp_path, capsys):
    """tok512 folds runs of spaces (SentencePiece's remove_extra_whitespaces); llama.cpp's SPM tokenizer does not,
    so the export says so, and llama.cpp indeed splits 'a  b   c' otherwise. Llama 2's vocabulary keeps spaces."""
    from minillama.interop.llamacpp import collapses_whitespace
    from minillama.tokenizer import Tokenizer

    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    assert "note: this SentencePiece model folds runs of spaces into one" in capsys.readouterr().err
    tokenizer = load_checkpoint_tokenizer(load_checkpoint(stories)[1])
    text = "a  b   c    d"
    assert in_child(llama_cpp_child.tokenize, str(tmp_path / "m.gguf"), [text])[0] != tokenizer.encode(text)
    assert not collapses_whitespace(Tokenizer(data_file(test_data, "llama2_tokenizer.model")))
