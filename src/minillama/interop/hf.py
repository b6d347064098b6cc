"""Hugging Face transformers' LlamaForCausalLM layout: config, weight names, and directory export/import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minillama.checkpoint import (
    IMPORTED_CHECKPOINT_FILES,
    is_checkpoint,
    load_checkpoint,
    load_checkpoint_tokenizer,
    model_state_dict,
    save_checkpoint,
)
from minillama.config import ModelConfig, from_dict
from minillama.device import DTYPES
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import claim_output, write_directory_atomically
from minillama.generate import document_end_ids
from minillama.interop.rotary import halves_to_interleaved, interleaved_to_halves
from minillama.model import meta_model
from minillama.tokenizer import Tokenizer, check_vocab

# Mini Llama name -> Hugging Face name, per block and for the rest of the model.
BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
MODEL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in MODEL_NAMES:
        return MODEL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{BLOCK_NAMES[rest]}"


def hf_config(config: ModelConfig, bos_id: int = 1, eos_id: int = 2, dtype: str = "float32") -> dict[str, Any]:
    """config.json for LlamaForCausalLM. rope_theta is written both the transformers 4.x way and the 5.x way."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }


def to_hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Mini Llama weights to transformers' names and reorder wq/wk rows to its rotary layout."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_halves(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_halves(tensor, config.kv_heads)
        out[hf_name(name)] = tensor.contiguous()
    return out


def from_hf_state_dict(config: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`; a tied checkpoint may omit or include lm_head.weight."""
    expected = model_state_dict(meta_model(config))
    out = {}
    for name in expected:
        source = hf_name(name)
        if source not in hf_state:
            raise MiniLlamaError(f"the Hugging Face checkpoint lacks tensor '{source}'")
        tensor = hf_state[source]
        if name.endswith("attention.wq.weight"):
            tensor = halves_to_interleaved(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = halves_to_interleaved(tensor, config.kv_heads)
        if tensor.shape != expected[name].shape:
            raise MiniLlamaError(f"tensor '{source}' has shape {tuple(tensor.shape)}; config.json implies {tuple(expected[name].shape)}")
        out[name] = tensor.contiguous()
    known = {hf_name(name) for name in expected} | {"lm_head.weight"}
    for name in hf_state.keys() - known:
        if "rotary_emb" not in name:
            raise MiniLlamaError(f"the Hugging Face checkpoint has tensor '{name}', which a Llama without biases does not have")
    return out


def tokenizer_files(tokenizer: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """The JSON files that let AutoTokenizer load our SentencePiece model as a Llama tokenizer."""
    piece = tokenizer.id_to_piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id), "unk_token": piece(tokenizer.sp.unk_id())}
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "LlamaTokenizer",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "add_prefix_space": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_seq_len,
        },
        "special_tokens_map.json": special,
    }


def write_fast_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    """Write tokenizer.json beside tokenizer.model, so that AutoTokenizer loads a fast tokenizer that gives
    SentencePiece's ids for any text.

    What SentencePiece does, rebuilt in `tokenizers`: collapse and strip runs of spaces (only for models trained
    to), prefix "▁" and replace spaces by it; split into SentencePiece's words (a run of "▁" and the text up to
    the next "▁"); then BPE in SentencePiece's order, which merges the adjacent pair whose merged piece has the
    highest score (transformers' own conversion orders merges otherwise, and Llama 2 then splits "  x" wrongly).
    Literal "<s>", "</s>" and "<unk>" in text stay text, as in SentencePiece (`split_special_tokens`).
    """
    try:
        import transformers
        from tokenizers import Regex, models, normalizers, pre_tokenizers
    except ImportError:
        return  # AutoTokenizer will convert tokenizer.model itself (with sentencepiece and protobuf installed)
    sp = tokenizer.sp
    fast = transformers.AutoTokenizer.from_pretrained(folder)
    backend = fast.backend_tokenizer
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    mergeable = [i for i in range(sp.get_piece_size()) if sp.is_control(i) + sp.is_unknown(i) + sp.is_byte(i) == 0]
    merges = sorted(
        ((sp.get_score(i), i, piece[:k], piece[k:]) for i in mergeable if len(piece := sp.id_to_piece(i)) > 1
         for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab),
        key=lambda merge: (-merge[0], merge[1]),
    )
    backend.model = models.BPE(vocab, [(left, right) for _, _, left, right in merges], unk_token=sp.id_to_piece(sp.unk_id()),
                               byte_fallback=any(sp.is_byte(i) for i in range(sp.get_piece_size())), fuse_unk=True)
    collapses_spaces = sp.encode("a  b") == sp.encode("a b")
    # \A and \z, not ^ and $: in the regex dialect of `tokenizers` those also match at every newline.
    collapse = [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")] if collapses_spaces else []
    backend.normalizer = normalizers.Sequence(collapse + [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")
    fast.save_pretrained(folder)
    # The Llama tokenizer class rebuilds its own pipeline on load; the generic fast class uses tokenizer.json as is.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", split_special_tokens=True)
    config_path.write_text(json.dumps(config, indent=2))


# What `export hf` writes; --force replaces a folder that holds these and nothing else.
HF_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json")


def is_hf_export(path: Path) -> bool:
    """A directory an earlier `export hf` wrote: a Llama config.json beside a model.safetensors that reads."""
    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((Path(path) / "config.json").read_text())
        with safe_open(str(Path(path) / "model.safetensors"), "pt") as weights:
            weights.keys()
    except (OSError, ValueError, SafetensorError):
        return False
    return isinstance(config, dict) and config.get("architectures") == ["LlamaForCausalLM"]


def export_hf(checkpoint: Path, out_dir: Path, dtype: str = "float32", tokenizer_path: Path | None = None,
              force: bool = False) -> Path:
    """Write a directory that AutoModelForCausalLM and AutoTokenizer load as Llama. An existing OUT is replaced
    only with `force`, and only when it is an earlier export."""
    if dtype not in DTYPES:
        raise ArgumentError("{dtype} {value!r} is not supported; choose one of: {choices}", value=dtype, choices=", ".join(DTYPES))
    claim_output(out_dir, [checkpoint], "Hugging Face export", force, is_hf_export, directory=True, owned=HF_EXPORT_FILES)
    model, info = load_checkpoint(checkpoint)
    tokenizer = load_checkpoint_tokenizer(info, tokenizer_path)
    config = info.config
    state = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state_dict(config, model_state_dict(model)).items()}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config(config, tokenizer.bos_id, tokenizer.eos_id, dtype), indent=2))
        (tmp / "generation_config.json").write_text(
            # transformers' generate stops where Mini Llama and run.c do: at the BOS that starts the next document.
            json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": list(document_end_ids(tokenizer))}, indent=2)
        )
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
        for name, content in tokenizer_files(tokenizer, config.max_seq_len).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        write_fast_tokenizer(tmp, tokenizer)

    return write_directory_atomically(Path(out_dir), fill)


def config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig for a transformers Llama config.json, refusing what our model does not implement."""
    if not isinstance(hf, dict):
        raise MiniLlamaError(f"{where}: expected a JSON object of fields, got a {type(hf).__name__}")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if type(hf.get(key)) is not int or hf[key] < 1:
            raise MiniLlamaError(f"{where}: '{key}' is {hf.get(key)!r}; expected a positive integer")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type") != "llama" or architectures != ["LlamaForCausalLM"]:
        raise MiniLlamaError(
            f"{where}: model_type {hf.get('model_type')!r} / architectures {architectures} is not supported; only LlamaForCausalLM is"
        )
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise MiniLlamaError(f"{where}: '{key}' is {json.dumps(hf[key])}; expected a JSON object (or null)")
    if "rope_theta" in hf and (not isinstance(hf["rope_theta"], (int, float)) or isinstance(hf["rope_theta"], bool)):
        raise MiniLlamaError(f"{where}: 'rope_theta' is {json.dumps(hf['rope_theta'])}; expected a number")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise MiniLlamaError(f"{where}: rope scaling type {rope_type!r} is not supported; only plain rotary embeddings are")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise MiniLlamaError(f"{where}: {flag} is true; Mini Llama's Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise MiniLlamaError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; only silu (SwiGLU) is")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise MiniLlamaError(f"{where}: head_dim {hf['head_dim']} differs from hidden_size/num_attention_heads; not supported")
    # Through from_dict, so that every value is checked for its type and range before anything is written.
    return from_dict(ModelConfig, {
        "dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads, "vocab_size": hf["vocab_size"],
        "hidden_dim": hf["intermediate_size"], "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }, f"{where} (as Mini Llama's model config)")


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, single-file or sharded (model.safetensors.index.json)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = _indexed_files(index)
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MiniLlamaError(
            f"{model_dir} has no model.safetensors (or index); Mini Llama reads only safetensors, never pickled .bin files"
        )
    state = {}
    for name in files:
        try:
            state.update(load_file(str(model_dir / name)))
        except (SafetensorError, OSError) as exc:
            raise MiniLlamaError(f"{model_dir / name} cannot be read ({exc})") from None
    return state


def _indexed_files(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index maps its tensors to."""
    try:
        files = set(json.loads(index.read_text())["weight_map"].values())
        if not files or not all(isinstance(f, str) for f in files):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise MiniLlamaError(f"{index} has no 'weight_map' from tensor names to .safetensors files; "
                             "restore the index as the model was published, or remove it if model.safetensors is whole") from None
    return sorted(files)


def import_hf(model_dir: Path, out_checkpoint: Path, tokenizer_path: Path | None = None, force: bool = False) -> Path:
    """Turn a local transformers Llama directory into a Mini Llama checkpoint (float32)."""
    model_dir = Path(model_dir)
    if is_checkpoint(model_dir):
        raise MiniLlamaError(f"{model_dir} is a Mini Llama checkpoint already; every command takes it as it is")
    claim_output(out_checkpoint, [model_dir], "checkpoint", force, is_checkpoint, directory=True, owned=IMPORTED_CHECKPOINT_FILES)
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MiniLlamaError(f"{model_dir / 'config.json'} cannot be read ({exc}); pass a transformers model directory") from None
    config = config_from_hf(hf, str(model_dir / "config.json"))
    state = {k: v.float() for k, v in from_hf_state_dict(config, read_hf_weights(model_dir)).items()}
    tokenizer = None
    if tokenizer_path or (model_dir / "tokenizer.model").is_file():
        tokenizer = Tokenizer(tokenizer_path or model_dir / "tokenizer.model")
        check_vocab(tokenizer, config.vocab_size, str(model_dir), "pass the model's own tokenizer.model as {tokenizer_path}")
    model = meta_model(config)
    return save_checkpoint(out_checkpoint, model, tokenizer, metadata={"imported_from": str(model_dir)}, state_dict=state)
