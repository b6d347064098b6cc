import json

import pytest
import torch
from safetensors.torch import load_file

from minillama.checkpoint import (
    load_checkpoint,
    load_checkpoint_tokenizer,
    save_checkpoint,
)
from minillama.config import ModelConfig
from minillama.errors import MiniLlamaError
from minillama.layout import find_checkpoint
from minillama.model import Transformer


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, small_config, tokenizer, tie):
    import dataclasses

    model = Transformer(dataclasses.replace(small_config, tie_embeddings=tie))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, metadata={"step": 7})
    loaded, info = load_checkpoint(tmp_path / "ckpt")
    assert info.config == model.config and info.metadata == {"step": 7}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    tokens = torch.randint(0, small_config.vocab_size, (1, 20))
    assert torch.equal(model.eval()(tokens)[0], loaded.eval()(tokens)[0])
    assert load_checkpoint_tokenizer(info).fingerprint == tokenizer.fingerprint


def test_tied_head_is_stored_once(tmp_path, small_config):
    save_checkpoint(tmp_path / "ckpt", Transformer(small_config))
    assert "output.weight" not in load_file(str(tmp_path / "ckpt" / "model.safetensors"))


def test_truncated_weights_give_a_clear_error(tmp_path, small_config):
    save_checkpoint(tmp_path / "ckpt", Transformer(small_config))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MiniLlamaError, match="model.safetensors cannot be read"):
        load_checkpoint(tmp_path / "ckpt")


def test_weights_from_another_config_name_the_mismatch(tmp_path, small_config):
    save_checkpoint(tmp_path / "ckpt", Transformer(small_config))
    config_path = tmp_path / "ckpt" / "config.json"
    data = json.loads(config_path.read_text())
    data["model"]["vocab_size"] = 400
    config_path.write_text(json.dumps(data))
    with pytest.raises(MiniLlamaError, match=r"'tok_embeddings.weight' has shape \(320, 64\), config.json implies \(400, 64\)"):
        load_checkpoint(tmp_path / "ckpt")


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(MiniLlamaError, match="'format' is None; expected 'minillama-checkpoint'"):
        load_checkpoint(tmp_path)
    with pytest.raises(MiniLlamaError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "missing")


def test_vocab_mismatch_names_both_sizes(tmp_path, tokenizer):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16))
    save_checkpoint(tmp_path / "ckpt", model)
    _, info = load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(MiniLlamaError, match=r"tokenizer .* has vocab 320, checkpoint .* has 32000"):
        load_checkpoint_tokenizer(info, tokenizer.path)


def test_failed_save_leaves_no_checkpoint(tmp_path, small_config, monkeypatch):
    import minillama.checkpoint as checkpoint

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt", Transformer(small_config))
    assert list(tmp_path.iterdir()) == []


def test_run_directory_resolves_to_newest_checkpoint(tmp_path, small_config):
    model = Transformer(small_config)
    for step in (100, 2000, 300):
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step:07d}", model, training_state={"step": step})
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0009000", model)  # damaged: its training state is gone
    assert find_checkpoint(tmp_path / "run").name == "step_0002000"
