import dataclasses
import json
import os
import random
import struct
import subprocess

import numpy as np
import pytest
import torch
from conftest import data_file
from safetensors.torch import load_file

from minillama.checkpoint import load_checkpoint, model_state_dict, save_checkpoint
from minillama.cli import main
from minillama.config import ModelConfig
from minillama.errors import MiniLlamaError
from minillama.generate import document_end_ids, generate_tokens
from minillama.interop.hf import export_hf, import_hf
from minillama.interop.llama2c import (
    export_llama2c,
    export_llama2c_tokenizer,
    import_llama2c,
    read_llama2c,
)
from minillama.interop.rotary import halves_to_interleaved, interleaved_to_halves
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def sharpened(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


def test_rotary_layout_conversion_round_trips():
    w = torch.randn(4 * 8, 16)
    halves = interleaved_to_halves(w, 4)
    assert not torch.equal(halves, w) and torch.equal(halves_to_interleaved(halves, 4), w)
    assert torch.equal(halves[:4], w[0:8:2][:4])  # first half of head 0 = its even dims


@pytest.mark.parametrize("tie", [True, False])
def test_export_hf_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, small_config, tokenizer, tie):
    model = sharpened(Transformer(dataclasses.replace(small_config, tie_embeddings=tie, rope_theta=20000.0)))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.config.num_key_value_heads == 2 and hf_model.config.tie_word_embeddings == tie
    tokens = torch.randint(0, small_config.vocab_size, (2, 100))
    with torch.no_grad():
        assert (model(tokens)[0] - hf_model(tokens).logits).abs().max() < 1e-4
        prompt = [1, 40, 41, 42]
        theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30, min_new_tokens=30)[0, 4:].tolist()
    assert generate_tokens(model, [prompt], 30, temperature=0) == [theirs]


def whitespace_and_unicode_strings(n: int, seed: int = 0) -> list[str]:
    """Random concatenations of the cases tokenizers disagree on: runs of spaces, newlines and tabs at either end
    and inside, non-ASCII letters, emoji, digits, literal special-token text."""
    rng = random.Random(seed)
    atoms = [" ", "  ", "   ", "\n", "\t", "\n\n", " \n", "\r\n", "a", "the", "Hello", "world", "naïve", "café",
             "日本語", "🙂", "x", "1234", ".", ",", "'s", "<s>", "</s>", "<unk>", "ß", "Ωmega", "\u00a0", "ﬁ", "－"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2_tokenizer.model", "tok512.model", "trained"])
def test_exported_tokenizer_gives_sentencepiece_ids_for_any_text(tmp_path, test_data, tokenizer, name):
    """transformers' AutoTokenizer on the exported directory against SentencePiece itself, on 3,000 generated
    whitespace-heavy and unicode strings and every paragraph of tiny shakespeare: Llama 2's tokenizer, llama2.c's
    whitespace-collapsing tok512, and one trained here."""
    if name != "trained":
        tokenizer = Tokenizer(data_file(test_data, name))
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tokenizer.vocab_size, multiple_of=16, max_seq_len=64))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = whitespace_and_unicode_strings(3000) + data_file(test_data, "tinyshakespeare.txt").read_text().split("\n\n")
    mismatches = [text for text in texts if hf_tokenizer(text)["input_ids"] != tokenizer.encode(text)]
    assert mismatches == []
    assert hf_tokenizer.decode(tokenizer.encode("x <s> y"), skip_special_tokens=True) == "x <s> y"


def test_exported_llama2_weights_take_the_asked_dtype(tmp_path, test_data):
    tokenizer = Tokenizer(data_file(test_data, "llama2_tokenizer.model"))
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=64))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "hf" / "model.safetensors")).values())


@pytest.mark.parametrize("tie, shard", [(True, False), (False, True)])
def test_import_hf_gives_the_same_logits(tmp_path, tie, shard):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=tie)
    torch.manual_seed(1)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if shard else "5GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == shard
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, info = load_checkpoint(tmp_path / "ckpt")
    assert info.config.rope_theta == 50000.0 and info.config.kv_heads == 2 and info.config.tie_embeddings == tie
    tokens = torch.randint(0, 300, (2, 90))
    with torch.no_grad():
        assert (model.eval()(tokens)[0] - hf_model(tokens).logits).abs().max() < 1e-4


def test_import_hf_refuses_what_it_does_not_implement(tmp_path):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    cases = [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
         "rope scaling type 'linear' is not supported"),
        ({"attention_bias": True}, "attention_bias is true"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "only LlamaForCausalLM is"),
    ]
    for change, message in cases:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(MiniLlamaError, match=message):
            import_hf(tmp_path / "hf", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(original))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(MiniLlamaError, match="reads only safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out")


# --- llama2.c ---------------------------------------------------------------------------------------------


def llama2c_numpy_forward(path, tokens):
    """An independent reading of a version-0 file and run.c's forward pass, in float64 NumPy."""
    data = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", data[:28])
    shared, vocab = vocab > 0, abs(vocab)
    flat = np.frombuffer(data, "<f4", offset=28).astype(np.float64)
    head, kv_dim = dim // n_heads, dim // n_heads * n_kv
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos : pos + n].reshape(shape)
        pos += n
        return out

    emb, att_norm = take(vocab, dim), take(n_layers, dim)
    wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    ffn_norm, w1, w2, w3 = take(n_layers, dim), take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    final_norm = take(dim)
    take(seq_len, head // 2), take(seq_len, head // 2)
    classifier = emb if shared else take(vocab, dim)

    def rmsnorm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(v, n):
        v = v.copy()
        for t in range(len(v)):
            for i in range(0, n, 2):
                angle = t / 10000.0 ** ((i % head) / head)
                a, b = v[t, i], v[t, i + 1]
                v[t, i], v[t, i + 1] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
        return v

    x = emb[tokens]
    T = len(tokens)
    for layer in range(n_layers):
        xb = rmsnorm(x, att_norm[layer])
        q, k, v = rope(xb @ wq[layer].T, dim), rope(xb @ wk[layer].T, kv_dim), xb @ wv[layer].T
        out = np.zeros((T, dim))
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            qh, kh, vh = q[:, h * head : (h + 1) * head], k[:, g * head : (g + 1) * head], v[:, g * head : (g + 1) * head]
            scores = qh @ kh.T / np.sqrt(head) + np.triu(np.full((T, T), -np.inf), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, h * head : (h + 1) * head] = (probs / probs.sum(-1, keepdims=True)) @ vh
        x = x + out @ wo[layer].T
        xb = rmsnorm(x, ffn_norm[layer])
        h1, h3 = xb @ w1[layer].T, xb @ w3[layer].T
        x = x + (h1 / (1 + np.exp(-h1)) * h3) @ w2[layer].T
    return rmsnorm(x, final_norm) @ classifier.T


def test_stories260k_imports_and_matches_a_numpy_llama2c_forward(tmp_path, test_data):
    source = data_file(test_data, "stories260K.bin")
    import_llama2c(source, tmp_path / "ckpt", data_file(test_data, "tok512.model"))
    model, info = load_checkpoint(tmp_path / "ckpt")
    assert (info.config.dim, info.config.n_layers, info.config.n_heads, info.config.kv_heads) == (64, 5, 8, 4)
    assert (info.config.ffn_hidden_dim, info.config.vocab_size, info.config.max_seq_len, info.config.tie_embeddings) == (172, 512, 512, True)
    assert model.layers[0].attention.wk.weight.shape == (32, 64)
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421]
    with torch.no_grad():
        ours = model.eval()(torch.tensor([tokens]))[0][0].double().numpy()
    assert np.abs(ours - llama2c_numpy_forward(source, tokens)).max() < 1e-4


def test_stories260k_export_is_byte_identical_and_round_trips(tmp_path, test_data):
    source = data_file(test_data, "stories260K.bin")
    import_llama2c(source, tmp_path / "ckpt", data_file(test_data, "tok512.model"))
    export_llama2c(tmp_path / "ckpt", tmp_path / "v0.bin", version=0)
    assert (tmp_path / "v0.bin").read_bytes() == source.read_bytes()
    export_llama2c(tmp_path / "ckpt", tmp_path / "v1.bin", version=1)
    _, original = read_llama2c(source)
    config, again = read_llama2c(tmp_path / "v1.bin")
    assert (tmp_path / "v1.bin").read_bytes()[:4] == b"24ka" and original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_tok512_export_is_byte_identical_to_llama2c(tmp_path, test_data):
    export_llama2c_tokenizer(data_file(test_data, "tok512.model"), tmp_path / "tok512.bin")
    assert (tmp_path / "tok512.bin").read_bytes() == data_file(test_data, "tok512.bin").read_bytes()


@pytest.mark.parametrize("version", [0, 1])
def test_untied_model_round_trips_through_llama2c(tmp_path, small_config, tokenizer, version):
    model = Transformer(dataclasses.replace(small_config, tie_embeddings=False))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_llama2c(tmp_path / "ckpt", tmp_path / "m.bin", version=version)
    if version == 0:
        assert struct.unpack_from("7i", (tmp_path / "m.bin").read_bytes())[5] == -320  # unshared classifier
    import_llama2c(tmp_path / "m.bin", tmp_path / "back", tokenizer.path)
    back, _ = load_checkpoint(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(model_state_dict(model).values(), model_state_dict(back).values()))


def test_bad_llama2c_files(tmp_path, small_config, tokenizer, capsys):
    save_checkpoint(tmp_path / "ckpt", Transformer(small_config), tokenizer)
    export_llama2c(tmp_path / "ckpt", tmp_path / "good.bin", version=1)
    good = (tmp_path / "good.bin").read_bytes()
    cases = {
        "version2.bin": (good[:4] + struct.pack("i", 2) + good[8:], "format version 2 is not supported"),
        "short.bin": (good[:-8], "has .* bytes, its version-1 header implies"),
        "heads.bin": (struct.pack("7i", 64, 96, 2, 3, 3, 320, 128) + b"\0" * 100, "gives no valid \\(even\\) head dimension"),
        "tiny.bin": (b"\0" * 10, "too few for a llama2.c header"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MiniLlamaError, match=message):
            import_llama2c(tmp_path / name, tmp_path / "out", tokenizer.path)
        assert not (tmp_path / "out").exists()
    other = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=16, max_seq_len=32))
    save_checkpoint(tmp_path / "other", other)
    export_llama2c(tmp_path / "other", tmp_path / "v512.bin")
    assert main(["import", "llama2c", str(tmp_path / "v512.bin"), str(tmp_path / "out"), "--tokenizer", str(tokenizer.path)]) == 2
    err = capsys.readouterr().err
    assert "has vocab 320" in err and "has 512" in err
    assert not (tmp_path / "out").exists()


def test_llama2c_export_refuses_other_rope_theta(tmp_path, small_config):
    save_checkpoint(tmp_path / "ckpt", Transformer(dataclasses.replace(small_config, rope_theta=500000.0)))
    with pytest.raises(MiniLlamaError, match="llama2.c hard-codes rope_theta 10000"):
        export_llama2c(tmp_path / "ckpt", tmp_path / "m.bin")
    assert not (tmp_path / "m.bin").exists()


def read_llama2c_v1(path):
    """An independent reading of llama2.c's version-1 layout as its export.py writes it: a 256-byte header
    (uint32 magic 0x616b3432, int32 version, 7 int32 params, uint8 shared-classifier flag, zero padding), then
    float32: every layer's attention norm, every layer's ffn norm, the final norm, the token embedding, then per
    matrix kind all layers of wq, wk, wv, wo, w1, w2, w3, and the classifier when it is not shared."""
    data = open(path, "rb").read()
    magic, version, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<Ii7i", data)
    shared = data[36]
    assert (magic, version) == (0x616B3432, 1) and data[37:256] == bytes(219)
    flat = np.frombuffer(data, "<f4", offset=256)
    kv_dim = dim // n_heads * n_kv
    out, offset = {}, 0

    def take(name, *shape):
        nonlocal offset
        size = int(np.prod(shape))
        out[name] = torch.from_numpy(flat[offset : offset + size].reshape(shape).copy())
        offset += size

    for i in range(n_layers):
        take(f"layers.{i}.attention_norm.weight", dim)
    for i in range(n_layers):
        take(f"layers.{i}.ffn_norm.weight", dim)
    take("norm.weight", dim)
    take("tok_embeddings.weight", vocab, dim)
    shapes = {"attention.wq": (dim, dim), "attention.wk": (kv_dim, dim), "attention.wv": (kv_dim, dim), "attention.wo": (dim, dim),
              "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}
    for kind, shape in shapes.items():
        for i in range(n_layers):
            take(f"layers.{i}.{kind}.weight", *shape)
    if not shared:
        take("output.weight", vocab, dim)
    assert offset == len(flat)
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_llama2c_v1_export_follows_the_published_layout(tmp_path, small_config, tokenizer, tie):
    model = Transformer(dataclasses.replace(small_config, tie_embeddings=tie))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_llama2c(tmp_path / "ckpt", tmp_path / "v1.bin", version=1)
    tensors = read_llama2c_v1(tmp_path / "v1.bin")
    expected = model_state_dict(model)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[name], expected[name]) for name in expected)


def test_transformers_generate_stops_where_minillama_does(tmp_path, small_config, tokenizer):
    """Training separates documents with BOS, so a model ends a text by emitting BOS. Make greedy decoding reach
    BOS at step k (the head's BOS row points along step k's final hidden state, just long enough to win there):
    Mini Llama's document-end rule stops there, and so does transformers' generate with the exported config."""
    model = Transformer(dataclasses.replace(small_config, tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharp enough to be far from ties, not so sharp that it repeats itself
            if p.dim() == 2:
                p.mul_(4)
    prompt = [1, 40, 41, 42]
    free = generate_tokens(model, [prompt], 30, temperature=0)[0]
    hidden = []
    model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + free]))[0][0, len(prompt) - 1 :]
    states = hidden[-1][0, len(prompt) - 1 :]
    for k in range(3, 30):
        scale = (logits[k].max() + 1.0) / states[k].dot(states[k])
        with torch.no_grad():
            model.output.weight[tokenizer.bos_id] = scale * states[k]
        stopped = generate_tokens(model, [prompt], 30, temperature=0, stop_ids=document_end_ids(tokenizer))[0]
        if len(stopped) == k:
            break
    assert len(stopped) == k < 30 and stopped == free[:k]
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30)[0, len(prompt):].tolist()
    assert theirs == stopped + [tokenizer.bos_id]


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_exports_and_imports_never_replace_what_they_did_not_write(tmp_path, small_config, tokenizer, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step_0000001", Transformer(small_config), tokenizer, training_state={"step": 1})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine too")
    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    assert main(["export", "llama2c", str(run), str(tmp_path / "m.bin")]) == 0
    assert main(["export", "llama2c-tokenizer", str(tokenizer.path), str(tmp_path / "tok.bin")]) == 0
    capsys.readouterr()
    cases = [
        (["export", "hf", str(run), str(run)], "is or holds the source"),
        (["export", "hf", str(run), str(run / "checkpoints" / "step_0000001" / "hf")], "is or holds the source"),
        (["export", "hf", str(run), str(tmp_path / "file.txt"), "--force"], "file.txt is a file; give a new directory path"),
        (["export", "hf", str(run), str(tmp_path / "hf")], "hf already exists; choose a new path"),
        (["export", "llama2c", str(run), str(tmp_path / "file.txt"), "--force"], "file.txt exists and is not a llama2.c model file"),
        (["export", "llama2c", str(run), str(tmp_path / "notes")], "notes is a directory; give a new file path"),
        (["export", "llama2c-tokenizer", str(tokenizer.path), str(tmp_path / "m.bin"), "--force"], "m.bin exists and is not a run.c tokenizer file"),
        (["import", "hf", str(tmp_path / "hf"), str(tmp_path / "hf")], "is or holds the source"),
        (["import", "hf", str(tmp_path / "hf"), str(tmp_path / "notes"), "--force"], "notes exists and is not a checkpoint"),
        (["import", "llama2c", str(tmp_path / "m.bin"), str(run), "--tokenizer", str(tokenizer.path), "--force"], "run exists and is not a checkpoint"),
    ]
    before = tree(tmp_path)
    for argv, message in cases:
        assert main(argv) == 2, argv
        *used, error = capsys.readouterr().err.splitlines()
        assert used in ([], [f"using {run / 'checkpoints' / 'step_0000001'}"]) and error.startswith("minillama: error: ")
        assert message in error, (argv, error)
        assert tree(tmp_path) == before, argv
    # --force replaces an earlier output of the same kind
    assert main(["export", "hf", str(run), str(tmp_path / "hf"), "--dtype", "bfloat16", "--force"]) == 0
    assert main(["export", "llama2c", str(run), str(tmp_path / "m.bin"), "--version", "1", "--force"]) == 0
    assert main(["export", "llama2c-tokenizer", str(tokenizer.path), str(tmp_path / "tok.bin"), "--force"]) == 0
    assert main(["import", "llama2c", str(tmp_path / "m.bin"), str(tmp_path / "back"), "--tokenizer", str(tokenizer.path)]) == 0
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--force"]) == 0
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and (tmp_path / "file.txt").read_text() == "mine too"


@pytest.mark.slow
def test_leftovers_of_a_killed_export_are_cleared_by_the_next_one_and_a_live_writers_are_not(tmp_path, small_config, tokenizer,
                                                                                               corpus_file):
    save_checkpoint(tmp_path / "ckpt", Transformer(small_config), tokenizer)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer runs, as after kill -9
    left = [tmp_path / f".hf.tmp-{dead.pid}-x1y2", tmp_path / f".m.bin.{dead.pid}-a1b2.tmp", tmp_path / f".tok.model.{dead.pid}-c3.tmp"]
    left[0].mkdir()
    (left[0] / "model.safetensors").write_bytes(b"half")
    for path in left[1:]:
        path.write_bytes(b"half")
    live = tmp_path / f".hf.tmp-{os.getpid()}-q9"  # a writer that is still running: not ours to take
    live.mkdir()
    user = [tmp_path / ".hf.notes", tmp_path / "hf.tmp"]  # look alike, but not our temporary names
    user[0].write_text("mine")
    user[1].write_text("mine")
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert main(["export", "llama2c", str(tmp_path / "ckpt"), str(tmp_path / "m.bin")]) == 0
    assert main(["tokenizer", "train", str(corpus_file), "--vocab-size", "300", "--out", str(tmp_path / "tok.model")]) == 0
    assert not any(p.exists() for p in left)
    assert live.exists() and all(p.read_text() == "mine" for p in user)
