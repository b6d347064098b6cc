"""llama.cpp's GGUF files, written with the `gguf` package (the format's own library, kept with llama.cpp).

A GGUF file holds the model's hyperparameters and tokenizer as key-value metadata and its tensors under
llama.cpp's names. Mini Llama's weights need no reordering: llama.cpp's "llama" architecture rotates adjacent pairs
of each head's dimensions, as Mini Llama and Meta do (Hugging Face's halves layout is what its converter undoes).
A tied output head is stored once, as the token embedding, which llama.cpp then also uses as the head.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillama.checkpoint import (
    load_checkpoint,
    load_checkpoint_tokenizer,
    model_state_dict,
)
from minillama.config import ModelConfig
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import claim_output, fill_file_atomically
from minillama.tokenizer import Tokenizer

ARCHITECTURE = "llama"
DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_0_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values, each with its own scale

GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "output.weight": "output.weight"}
BLOCK_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def gguf_name(name: str) -> str:
    """llama.cpp's name for a Mini Llama tensor: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{BLOCK_NAMES[rest]}"


def is_gguf_file(path: Path) -> bool:
    """A GGUF file, read whole by the gguf package (header, metadata, tensor table and data), not by its magic alone."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        return len(reader.tensors) > 0
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        return False


def export_gguf(checkpoint: Path, out: Path, dtype: str = "f16", force: bool = False,
                tokenizer_path: Path | None = None) -> tuple[Path, list[str]]:
    """Write a checkpoint as a GGUF file for llama.cpp, atomically (an existing file only with `force`, and only
    when it is a GGUF file). Matrices are stored in `dtype`, norms in float32 (as llama.cpp's own converter does).
    Returns the path and the names of matrices that q8_0 could not take (rows not a multiple of 32), stored as f16."""
    try:
        import gguf
    except ImportError:
        raise MiniLlamaError("exporting GGUF needs the 'gguf' package: pip install 'minillama[gguf]'") from None
    if dtype not in DTYPES:
        raise ArgumentError("{dtype} {value} is not supported; choose one of {choices}", value=dtype, choices=", ".join(DTYPES))
    out = Path(out)
    claim_output(out, [checkpoint], "GGUF file", force, is_gguf_file, directory=False)
    model, info = load_checkpoint(checkpoint)
    if info.tokenizer_path is None and tokenizer_path is None:  # before any default tokenizer is fetched
        raise ArgumentError("{checkpoint_dir} has no tokenizer.model; pass {tokenizer_path} (GGUF files carry their vocabulary)",
                            checkpoint_dir=info.path)
    tokenizer = load_checkpoint_tokenizer(info, tokenizer_path)
    config = info.config
    fell_back: list[str] = []

    def fill(path: Path) -> None:
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        _add_hyperparameters(writer, gguf, config, dtype, info.metadata)
        _add_vocabulary(writer, gguf, tokenizer)
        for name, tensor in model_state_dict(model).items():
            data, raw_dtype = _encode(tensor, dtype, gguf)
            if dtype == "q8_0" and tensor.dim() == 2 and raw_dtype != gguf.GGMLQuantizationType.Q8_0:
                fell_back.append(name)
            writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    fill_file_atomically(out, fill)
    return out, fell_back


def collapses_whitespace(tokenizer: Tokenizer) -> bool:
    """Whether the SentencePiece model folds runs of spaces into one before tokenizing (its normalizer's
    remove_extra_whitespaces, as llama2.c's tok512 has it): llama.cpp's SPM tokenizer does not fold them, so text
    with repeated spaces tokenizes differently there."""
    return tokenizer.encode("a  b", bos=False) == tokenizer.encode("a b", bos=False)


def _add_hyperparameters(writer: Any, gguf: Any, config: ModelConfig, dtype: str, metadata: dict[str, Any]) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(str(metadata.get("model_preset") or "mini-llama"))
    writer.add_file_type(file_types[dtype])
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_vocabulary(writer: Any, gguf: Any, tokenizer: Tokenizer) -> None:
    """The SentencePiece model as llama.cpp's "llama" tokenizer reads it: pieces, scores and kinds, and the ids
    of BOS/EOS/UNK, with BOS added to every text as Mini Llama does."""
    sp = tokenizer.sp
    kinds = []
    for i in range(sp.vocab_size()):
        if sp.IsUnknown(i):
            kinds.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            kinds.append(gguf.TokenType.CONTROL)
        elif sp.IsByte(i):
            kinds.append(gguf.TokenType.BYTE)
        elif sp.IsUnused(i):
            kinds.append(gguf.TokenType.UNUSED)
        else:
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.IdToPiece(i).encode("utf-8") for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.GetScore(i) for i in range(sp.vocab_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    # Mini Llama's documents are BOS-separated, so a sample ends at BOS as at EOS; llama.cpp ends generation at its
    # end-of-generation tokens (EOS, EOT, EOM), so BOS is named the end-of-turn token too.
    writer.add_eot_token_id(tokenizer.bos_id)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _encode(tensor: torch.Tensor, dtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """A tensor's data for the file and its GGML type (None: the numpy dtype says it). Norm gains (1-D) stay
    float32; q8_0 needs rows that are whole blocks of 32, else the matrix is stored as f16."""
    data = tensor.detach().float().numpy()
    if tensor.dim() == 1 or dtype == "f32":
        return data, None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK):
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, kind), kind
