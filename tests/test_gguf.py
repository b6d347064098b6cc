"""GGUF export, proven in llama.cpp itself (through llama-cpp-python): same tokenization, same greedy tokens, same
logits, and q8_0's cost measured."""

import numpy as np
import pytest
import torch
from conftest import data_file

from minillama.checkpoint import load_checkpoint, load_checkpoint_tokenizer
from minillama.cli import main
from minillama.generate import generate, generate_tokens
from minillama.interop.llamacpp import export_gguf, gguf_name

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the 'dev' extra builds it)")
gguf = pytest.importorskip("gguf", reason="needs the 'gguf' extra")

PROMPTS = ["Once upon a time", "The little dog", "She said: \"Hello", "One day, Lily and Tom went to the park and"]


def open_in_llama_cpp(path):
    # float32 KV cache (llama.cpp keeps it in f16 by default), so that only the weights' dtype differs between files
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def greedy_in_llama_cpp(llm, prompt_ids, steps):
    llm.reset()
    llm.eval(prompt_ids)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return tokens


def rounded_to_f16(model):
    """The model as an f16 GGUF file holds it: matrices rounded to float16, norms kept; computed in float32."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
    return model


@pytest.mark.slow
@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_llama_cpp_tokenizes_as_sentencepiece_and_decodes_greedily_as_mini_llama(which, request, tmp_path):
    checkpoint = request.getfixturevalue(which)
    model, info = load_checkpoint(checkpoint)
    tokenizer = load_checkpoint_tokenizer(info)
    texts = PROMPTS + ["digits 1234 and ünïcödé, tabs\tand\nnew lines", "ROMEO: Wherefore art thou?"]
    for dtype in ("f32", "f16"):
        out, fell_back = export_gguf(checkpoint, tmp_path / f"{dtype}.gguf", dtype)
        assert fell_back == []
        llm = open_in_llama_cpp(out)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text), (dtype, text)
        reference = model if dtype == "f32" else rounded_to_f16(load_checkpoint(checkpoint)[0])
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            ours = generate_tokens(reference.eval(), [ids], 30, temperature=0)[0]
            assert greedy_in_llama_cpp(llm, ids, 30) == ours, (dtype, prompt)


def test_f32_logits_of_a_64_token_sequence_agree(stories, tmp_path):
    """float32 on both sides; what differs is the order of summation inside matmuls (llama.cpp's blocked
    kernels vs torch's), worth ~1e-6 relative per op and compounding over 5 layers: 1e-4 absolute on logits of
    magnitude ~10 allows that and nothing more (a wrong rotary layout or norm is off by whole units)."""
    model, info = load_checkpoint(stories)
    out, _ = export_gguf(stories, tmp_path / "m.gguf", "f32")
    llm = open_in_llama_cpp(out)
    ids = load_checkpoint_tokenizer(info).encode("Once upon a time, there was a little girl named Lily. She loved to play outside "
                                                 "with her ball and her dog. One day, her mom said she could go to the park "
                                                 "with her friend Tom. They ran and jumped and laughed all day long.")[:64]
    assert len(ids) == 64
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))[0][0].numpy()
    theirs = np.array(llm.scores[:64])
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(ours).max() / 10)


@pytest.mark.slow
def test_q8_0_keeps_top1_and_perplexity_and_names_what_it_cannot_quantize(stories, tiny, test_data, tmp_path, capsys):
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
    llm = open_in_llama_cpp(out)
    llm.reset()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
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
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=0, n_threads=2, verbose=False)
    assert llm.n_ctx() == model.config.max_seq_len
    answer = llm.create_completion("Once upon a time", max_tokens=100, temperature=0)["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["text"] == ours


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
    assert capsys.readouterr().err == (f"using {stories}\nminillama: error: {tmp_path / 'notes.gguf'} already exists; choose a "
                                       "new path for the GGUF file, or pass --force to replace an earlier GGUF file there\n")
    assert main(["export", "gguf", str(stories), str(tmp_path / "notes.gguf"), "--force"]) == 2
    assert "exists and is not a GGUF file" in capsys.readouterr().err
    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf"), "--dtype", "q4_k"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "minillama: error: --dtype q4_k is not supported; choose one of f32, f16, bf16, q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf"] and (tmp_path / "notes.gguf").read_text() == "mine"
    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf")]) == 0
    assert main(["export", "gguf", str(stories), str(tmp_path / "m.gguf"), "--dtype", "f32", "--force"]) == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 0
