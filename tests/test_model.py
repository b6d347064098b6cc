import dataclasses

import pytest
import torch

from minillama.checkpoint import model_state_dict
from minillama.config import PRESETS, ModelConfig
from minillama.device import inference_dtype
from minillama.errors import MiniLlamaError
from minillama.interop.hf import hf_config, to_hf_state_dict
from minillama.model import Transformer, rotary_tables
from minillama.summary import training_flops_per_token


def hf_twin(model: Transformer):
    """transformers' LlamaForCausalLM holding the same weights as `model`."""
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in hf_config(model.config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    hf_model.load_state_dict(to_hf_state_dict(model.config, model_state_dict(model)), strict=not model.config.tie_embeddings)
    return hf_model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads", [2, None])
def test_logits_match_transformers_llama(small_config, tie, n_kv_heads):
    config = dataclasses.replace(small_config, tie_embeddings=tie, n_kv_heads=n_kv_heads, rope_theta=500.0)
    model = Transformer(config).eval()
    for p in model.parameters():  # move norms off 1.0 so a wrong norm placement would show
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    tokens = torch.randint(0, config.vocab_size, (3, config.max_seq_len))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf_twin(model)(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_rotary_positions_matter(small_config):
    """Guard for the test above: shuffling the prefix must change the last logits, so RoPE is exercised."""
    model = Transformer(small_config).eval()
    tokens = torch.randint(0, small_config.vocab_size, (1, 64))
    shuffled = torch.cat([tokens[:, :-1].flip(1), tokens[:, -1:]], dim=1)
    with torch.no_grad():
        assert not torch.allclose(model(tokens)[0][:, -1], model(shuffled)[0][:, -1], atol=1e-5)


def test_loss_is_cross_entropy_ignoring_minus_one(small_config):
    model = Transformer(small_config)
    tokens = torch.randint(0, small_config.vocab_size, (2, 16))
    targets = torch.randint(0, small_config.vocab_size, (2, 16))
    targets[0, :5] = -1
    targets[1, -3:] = -1
    logits, loss = model(tokens, targets)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != -1
    manual = -log_probs[keep].gather(1, targets[keep][:, None]).mean()
    assert abs(loss.item() - manual.item()) < 1e-6


def expected_parameter_count(c: ModelConfig) -> int:
    """Counted from the architecture, independently of the model code."""
    head_dim = c.dim // c.n_heads
    kv = c.n_kv_heads or c.n_heads
    attention = c.dim * c.dim * 2 + 2 * c.dim * kv * head_dim
    ffn = 3 * c.dim * c.ffn_hidden_dim
    embedding = c.vocab_size * c.dim
    return embedding * (1 if c.tie_embeddings else 2) + c.n_layers * (attention + ffn + 2 * c.dim) + c.dim


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(PRESETS[name])


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tie", [True, False])
def test_inspect_arithmetic_counts_the_built_models_parameters(name, tie):
    from minillama.summary import count_parameters

    config = dataclasses.replace(PRESETS[name], tie_embeddings=tie, n_kv_heads=PRESETS[name].n_heads // 2)
    with torch.device("meta"):
        model = Transformer(config)
    counts = count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["per_block"] == sum(p.numel() for p in model.layers[0].parameters())
    assert counts["output_head"] == (0 if tie else model.output.weight.numel())


def test_reference_preset_has_109529856_parameters():
    with torch.device("meta"):
        model = Transformer(PRESETS["mini-llama-109M"])
    assert sum(p.numel() for p in model.parameters()) == 109_529_856


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, hidden",
    [
        (768, 256, None, 2048),  # 3072 -> 2048, already a multiple
        (4096, 256, None, 11008),  # Llama 2 7B
        (5120, 256, None, 13824),  # Llama 2 13B
        (8192, 4096, 1.3, 28672),  # Llama 2 70B
        (4096, 1024, 1.3, 14336),  # Llama 3 8B
        (96, 32, None, 256),  # 384 -> 256
        (100, 64, None, 320),  # 400 -> 266 -> 320
    ],
)
def test_hidden_size_rule(dim, multiple_of, multiplier, hidden):
    config = ModelConfig(dim=dim, n_heads=dim // 4 if dim % 8 == 0 else 2, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert config.ffn_hidden_dim == hidden


def test_explicit_hidden_dim_overrides_rule():
    assert ModelConfig(hidden_dim=1000).ffn_hidden_dim == 1000


def test_residual_projections_get_smaller_init():
    config = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=1000, multiple_of=64)
    model = Transformer(config)
    wq_std = torch.stack([b.attention.wq.weight.std() for b in model.layers]).mean().item()
    wo_std = torch.stack([b.attention.wo.weight.std() for b in model.layers]).mean().item()
    w2_std = torch.stack([b.feed_forward.w2.weight.std() for b in model.layers]).mean().item()
    assert abs(wq_std - 0.02) < 1e-3
    assert abs(wo_std - 0.02 / 4) < 5e-4 and abs(w2_std - 0.02 / 4) < 5e-4


def test_untied_head_is_a_separate_parameter(small_config):
    tied = Transformer(small_config)
    untied = Transformer(dataclasses.replace(small_config, tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_dropout_only_in_training(small_config):
    model = Transformer(dataclasses.replace(small_config, dropout=0.5))
    tokens = torch.randint(0, small_config.vocab_size, (1, 16))
    model.eval()
    assert torch.equal(model(tokens)[0], model(tokens)[0])
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])


def test_rmsnorm_matches_formula():
    from minillama.model import RMSNorm

    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.arange(1.0, 9.0)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    x64 = x.double()
    expected = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16).double() * norm.weight.double()
    assert torch.allclose(norm(x).double(), expected, atol=1e-2)


def test_casting_the_model_keeps_the_rotary_tables_float32(small_config):
    model = Transformer(small_config).to(torch.bfloat16)
    cos, sin = rotary_tables(small_config.head_dim, small_config.max_seq_len, small_config.rope_theta)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)


@pytest.mark.parametrize("tie", [True, False])
def test_training_flops_per_token_by_hand(tie):
    """6 per matmul weight and token, plus 12 * layers * dim * seq_len for attention scores and values."""
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=128, max_seq_len=32,
                         tie_embeddings=tie)
    per_layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (64 * 128) + 2 * 64  # wq, wk+wv (2 kv heads of 16), wo, SwiGLU, 2 norms
    weights = 2 * per_layer + 64 + 100 * 64  # final norm, and the head's matmul (the tied embedding is that same matrix)
    assert weights == 80_448
    assert training_flops_per_token(config, 32) == 6 * 80_448 + 12 * 2 * 64 * 32 == 531_840


def test_inference_precision_policy(monkeypatch):
    assert inference_dtype(torch.device("cpu"), "auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    gpu = torch.device("cuda", 0)
    assert inference_dtype(gpu, "auto") == torch.float16  # emulated bf16 is never picked
    with pytest.raises(MiniLlamaError, match="Tesla T4 has no native bfloat16; use --dtype float16 or float32"):
        inference_dtype(gpu, "bfloat16")
