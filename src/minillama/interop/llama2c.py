"""llama2.c's checkpoint and tokenizer files, read and written.

Version 0 (what run.c reads): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
max_seq_len; vocab_size negative when the classifier is not shared), then float32 arrays, each stacked over
layers: token embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, the rotary cos and
sin tables (max_seq_len x head_dim/2), and the classifier if not shared.

Version 1: a 256-byte header (uint32 magic "ak42", int32 version 1, the seven int32 above with a positive
vocab_size, uint8 shared-classifier flag, zero padding), then float32: attention norms, ffn norms, final norm,
token embedding, wq, wk, wv, wo, w1, w2, w3, and the classifier if not shared.

Both assume rotary theta 10000 and RMSNorm eps 1e-5, and rotate adjacent pairs as Mini Llama does.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from minillama.checkpoint import (
    IMPORTED_CHECKPOINT_FILES,
    is_checkpoint,
    load_checkpoint,
    model_state_dict,
    save_checkpoint,
)
from minillama.config import ModelConfig
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import claim_output, require_regular_file, write_file_atomically
from minillama.model import meta_model
from minillama.tokenizer import Tokenizer, check_vocab

MAGIC = 0x616B3432  # "ak42" little-endian
HEADER_V1_BYTES = 256
LLAMA2C_ROPE_THETA, LLAMA2C_NORM_EPS = 10000.0, 1e-5

PER_LAYER = {
    "attention_norm": "layers.{}.attention_norm.weight", "ffn_norm": "layers.{}.ffn_norm.weight",
    "wq": "layers.{}.attention.wq.weight", "wk": "layers.{}.attention.wk.weight", "wv": "layers.{}.attention.wv.weight",
    "wo": "layers.{}.attention.wo.weight", "w1": "layers.{}.feed_forward.w1.weight",
    "w2": "layers.{}.feed_forward.w2.weight", "w3": "layers.{}.feed_forward.w3.weight",
}
ORDER = {
    0: ["tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "rope_cos", "rope_sin"],
    1: ["attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"],
}


def llama2c_rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin tables as llama2.c's export computes them, in float32, so exported files match its bytes."""
    head_dim = config.head_dim
    inv_freq = 1.0 / (torch.tensor(LLAMA2C_ROPE_THETA) ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(config.max_seq_len), inv_freq).float()
    return angles.cos().numpy(), angles.sin().numpy()


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    kv_dim, hidden, L = config.kv_heads * config.head_dim, config.ffn_hidden_dim, config.n_layers
    return {
        "tok_embeddings": (config.vocab_size, config.dim), "norm": (config.dim,), "output": (config.vocab_size, config.dim),
        "attention_norm": (L, config.dim), "ffn_norm": (L, config.dim), "wq": (L, config.dim, config.dim),
        "wk": (L, kv_dim, config.dim), "wv": (L, kv_dim, config.dim), "wo": (L, config.dim, config.dim),
        "w1": (L, hidden, config.dim), "w2": (L, config.dim, hidden), "w3": (L, hidden, config.dim),
        "rope_cos": (config.max_seq_len, config.head_dim // 2), "rope_sin": (config.max_seq_len, config.head_dim // 2),
    }


def _array(name: str, state: dict[str, torch.Tensor], config: ModelConfig) -> np.ndarray:
    if name in PER_LAYER:
        return np.stack([state[PER_LAYER[name].format(i)].float().numpy() for i in range(config.n_layers)])
    if name in ("rope_cos", "rope_sin"):
        return llama2c_rope_tables(config)[name == "rope_sin"]
    return state[f"{name}.weight"].float().numpy()


def is_llama2c_model(path: Path) -> bool:
    try:
        read_llama2c(path)
    except MiniLlamaError:
        return False
    return True


def is_llama2c_tokenizer(path: Path) -> bool:
    """A run.c tokenizer file, read whole: a uint32 max token length, then at least the three special tokens' records
    of finite float32 score, uint32 length (at most the max, which one token reaches) and that many bytes, to the end."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if len(data) < 4:
        return False
    max_length, offset, lengths = struct.unpack_from("I", data)[0], 4, []
    while offset + 8 <= len(data):
        score, length = struct.unpack_from("fI", data, offset)
        if not math.isfinite(score) or length > max_length:
            return False
        lengths.append(length)
        offset += 8 + length
    return offset == len(data) and len(lengths) >= 3 and max_length >= 1 and max(lengths) == max_length


def export_llama2c(checkpoint: Path, out: Path, version: int = 0, force: bool = False) -> Path:
    """Write a checkpoint as a llama2.c model file, atomically (an existing file only with `force`, and only
    when it is a llama2.c model file)."""
    if version not in ORDER:
        raise ArgumentError("{version} {value} is not supported; llama2.c's float32 formats are 0 and 1", value=version)
    claim_output(out, [checkpoint], "llama2.c model file", force, is_llama2c_model, directory=False)
    model, info = load_checkpoint(checkpoint)
    config = info.config
    if config.rope_theta != LLAMA2C_ROPE_THETA or config.norm_eps != LLAMA2C_NORM_EPS:
        raise MiniLlamaError(
            f"llama2.c hard-codes rope_theta {LLAMA2C_ROPE_THETA:g} and norm_eps {LLAMA2C_NORM_EPS:g}; this model has "
            f"{config.rope_theta:g} and {config.norm_eps:g}, so it would compute something else there"
        )
    state = model_state_dict(model)
    shared = config.tie_embeddings
    dims = (config.dim, config.ffn_hidden_dim, config.n_layers, config.n_heads, config.kv_heads)
    if version == 0:
        header = struct.pack("7i", *dims, config.vocab_size if shared else -config.vocab_size, config.max_seq_len)
    else:
        header = struct.pack("Ii7iB", MAGIC, 1, *dims, config.vocab_size, config.max_seq_len, int(shared))
        header += b"\0" * (HEADER_V1_BYTES - len(header))
    arrays = [_array(name, state, config) for name in ORDER[version]]
    if not shared:
        arrays.append(state["output.weight"].float().numpy())
    body = b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(Path(out), header + body)
    return Path(out)


def read_llama2c(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and Mini Llama state dict of a llama2.c model file (version 0 or 1), checked against its size."""
    path = Path(path)
    require_regular_file(path, "a llama2.c model")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MiniLlamaError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) < 28:
        raise MiniLlamaError(f"{path} has {len(data)} bytes, too few for a llama2.c header")
    if struct.unpack_from("I", data)[0] == MAGIC:
        version = struct.unpack_from("i", data, 4)[0]
        if version != 1:
            raise MiniLlamaError(f"{path}: llama2.c format version {version} is not supported; versions 0 and 1 (float32) are")
        *dims, vocab_size, max_seq_len, shared = struct.unpack_from("7iB", data, 8)
        offset = HEADER_V1_BYTES
    else:
        version = 0
        *dims, vocab_size, max_seq_len = struct.unpack_from("7i", data)
        shared, vocab_size, offset = vocab_size > 0, abs(vocab_size), 28
    dim, hidden_dim, n_layers, n_heads, n_kv_heads = dims
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len) <= 0:
        raise MiniLlamaError(f"{path}: header {dims + [vocab_size, max_seq_len]} has non-positive sizes; not a llama2.c model")
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise MiniLlamaError(
            f"{path}: dim {dim} with {n_heads} heads and {n_kv_heads} kv heads gives no valid (even) head dimension"
        )
    config = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                         hidden_dim=hidden_dim, max_seq_len=max_seq_len, rope_theta=LLAMA2C_ROPE_THETA,
                         norm_eps=LLAMA2C_NORM_EPS, tie_embeddings=bool(shared))
    shapes = _shapes(config)
    names = ORDER[version] + ([] if shared else ["output"])
    expected = offset + 4 * sum(int(np.prod(shapes[n])) for n in names)
    if len(data) != expected:
        raise MiniLlamaError(f"{path} has {len(data):,} bytes, its version-{version} header implies {expected:,}; "
                             "the file is truncated or its header is wrong")
    state = {}
    for name in names:
        count = int(np.prod(shapes[name]))
        array = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shapes[name]).copy())
        offset += 4 * count
        if name in PER_LAYER:
            state.update({PER_LAYER[name].format(i): array[i] for i in range(n_layers)})
        elif name not in ("rope_cos", "rope_sin"):  # recomputed from theta
            state[f"{name}.weight"] = array
    return config, state


def import_llama2c(path: Path, out_checkpoint: Path, tokenizer_path: Path, force: bool = False) -> Path:
    claim_output(out_checkpoint, [path, tokenizer_path], "checkpoint", force, is_checkpoint, directory=True,
                 owned=IMPORTED_CHECKPOINT_FILES)
    config, state = read_llama2c(path)
    tokenizer = Tokenizer(tokenizer_path)
    check_vocab(tokenizer, config.vocab_size, str(path), "pass the tokenizer the model was trained with")
    model = meta_model(config)
    return save_checkpoint(out_checkpoint, model, tokenizer, metadata={"imported_from": str(path)}, state_dict=state)


def export_llama2c_tokenizer(tokenizer_path: Path, out: Path, force: bool = False) -> Path:
    """run.c's tokenizer file: uint32 max token length, then per token float32 score, uint32 length, UTF-8
    bytes; '▁' becomes a space and BOS/EOS become '\\n<s>\\n' / '\\n</s>\\n'."""
    claim_output(out, [tokenizer_path], "run.c tokenizer file", force, is_llama2c_tokenizer, directory=False)
    tokenizer = Tokenizer(tokenizer_path)
    sp = tokenizer.sp
    pieces, scores = [], []
    for i in range(tokenizer.vocab_size):
        piece = {tokenizer.bos_id: "\n<s>\n", tokenizer.eos_id: "\n</s>\n"}.get(i, sp.id_to_piece(i))
        pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    body = b"".join(struct.pack("fI", score, len(piece)) + piece for piece, score in zip(pieces, scores))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(Path(out), struct.pack("I", max(len(p) for p in pieces)) + body)
    return Path(out)

