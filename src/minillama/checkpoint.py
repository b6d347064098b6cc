"""The checkpoint format: a directory with config.json, model.safetensors and (usually) tokenizer.model.

An FSDP run writes its weights sharded (a `sharded/` folder, see minillama.sharded) instead of model.safetensors;
everything that loads a checkpoint reads either.

Training adds training_state.pt (optimizer, schedule, data position, RNG) to the same directory. Every file is
written into a temporary directory that is renamed into place only when complete, so a crash never leaves a
directory that looks like a checkpoint but is not one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minillama.config import ModelConfig, from_dict, to_dict
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import require_regular_file, write_directory_atomically
from minillama.layout import CONFIG_FILE, SHARDED_DIR, TOKENIZER_FILE, TRAINING_STATE_FILE, WEIGHTS_FILE, find_checkpoint
from minillama.model import Transformer, meta_model, rotary_tables
from minillama.tensors import check_stored_tensors
from minillama.tokenizer import LLAMA2_TOKENIZER_SHA256, Tokenizer, check_vocab

FORMAT = "minillama-checkpoint"
FORMAT_VERSION = 1
# What an import writes: --force replaces a folder holding these and nothing else (never a training checkpoint).
IMPORTED_CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)


@dataclass
class Checkpoint:
    """What a checkpoint directory holds besides the weights."""

    path: Path
    config: ModelConfig
    tokenizer_fingerprint: str | None
    tokenizer_vocab_size: int | None
    metadata: dict[str, Any]

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.path / TOKENIZER_FILE
        return path if path.is_file() else None


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The weights to store: the tied output head is the embedding, so it is stored once."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["output.weight"]
    return state


def save_checkpoint(
    path: Path,
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    metadata: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (or an explicit `state_dict` in its layout) as a checkpoint directory at `path`, atomically.

    `metadata` is free-form JSON (step, run name, ...); `training_state` holds only tensors and plain Python
    values, so that it loads with torch.load(weights_only=True).
    """
    weights = state_dict if state_dict is not None else model_state_dict(model)
    return write_directory_atomically(path, lambda tmp: fill_checkpoint(tmp, path, model.config, tokenizer, metadata,
                                                                        training_state, weights))


def fill_checkpoint(tmp: Path, path: Path, config: ModelConfig, tokenizer: Tokenizer | None, metadata: dict[str, Any] | None,
                    training_state: dict[str, Any] | None, weights: dict[str, torch.Tensor] | None) -> None:
    """Write a checkpoint's files into `tmp` (to become `path`); `weights` None: the caller writes sharded weights."""
    config_json = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(config),
        "tokenizer": None if tokenizer is None else {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "metadata": metadata or {},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer.path, tmp / TOKENIZER_FILE)
    try:
        if weights is not None:
            save_file(weights, str(tmp / WEIGHTS_FILE))
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
    except (RuntimeError, SafetensorError) as exc:
        raise unwritable_checkpoint(path, exc) from None


def unwritable_checkpoint(path: Path, exc: BaseException) -> MiniLlamaError:
    """Writing plain tensors fails only when the file cannot be written; the libraries say so in their own words.
    The half-written directory is removed by the caller, and earlier checkpoints are untouched."""
    return MiniLlamaError(
        f"could not write checkpoint {path} ({str(exc).strip().splitlines()[-1][:80]}): a full disk, quota or "
        "file-size limit? free some space and run the same command again to resume from the last checkpoint"
    )


def read_checkpoint_info(path: Path) -> Checkpoint:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise MiniLlamaError(f"{path} is not a checkpoint directory (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    require_regular_file(config_path, f"a checkpoint's {CONFIG_FILE}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MiniLlamaError(f"{path} has no {CONFIG_FILE}; it is not a Mini Llama checkpoint") from None
    except UnicodeDecodeError as exc:
        raise MiniLlamaError(f"{config_path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                             "the checkpoint is damaged") from None
    except json.JSONDecodeError as exc:
        raise MiniLlamaError(f"{config_path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if isinstance(data, dict) and "model_type" in data and "format" not in data:
        raise MiniLlamaError(f"{path} is a Hugging Face model folder, not a Mini Llama checkpoint; convert it first: "
                             f"minillama import hf {path} OUT")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MiniLlamaError(f"{config_path}: 'format' is {data.get('format') if isinstance(data, dict) else None!r}; expected '{FORMAT}'")
    if data.get("format_version") != FORMAT_VERSION:
        raise MiniLlamaError(
            f"{config_path}: format_version {data.get('format_version')!r} is not supported; this Mini Llama reads {FORMAT_VERSION}"
        )
    tokenizer, metadata = data.get("tokenizer") or {}, data.get("metadata") or {}
    if not isinstance(tokenizer, dict) or not isinstance(metadata, dict):
        raise MiniLlamaError(f"{config_path}: 'tokenizer' and 'metadata' must be JSON objects; the checkpoint is damaged")
    step = metadata.get("step")
    if step is not None and (type(step) is not int or step < 0):
        raise MiniLlamaError(f"{config_path}: 'metadata.step' is {json.dumps(step)}; expected a whole number of steps "
                             "(the checkpoint is damaged)")
    return Checkpoint(
        path=path,
        config=from_dict(ModelConfig, data.get("model"), str(config_path)),
        tokenizer_fingerprint=tokenizer.get("fingerprint"),
        tokenizer_vocab_size=tokenizer.get("vocab_size"),
        metadata=metadata,
    )


def load_weights(path: Path, model: Transformer) -> None:
    """Copy a checkpoint's model.safetensors into an existing `model` (a resumed run's, whose optimizer holds its
    parameters), after checking keys, shapes and dtypes."""
    # A tied head is stored once, as the embedding; load_state_dict fills both through the shared Parameter.
    model.load_state_dict(_read_checked_weights(path, model), strict=not model.config.tie_embeddings)


def _read_checked_weights(path: Path, model: Transformer, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read model.safetensors (onto `device`) and check it against `model`'s keys, shapes and dtypes, naming the
    first mismatch."""
    weights_path = Path(path) / WEIGHTS_FILE
    expected = model_state_dict(model)
    if not weights_path.exists() and (Path(path) / SHARDED_DIR).is_dir():  # an FSDP run's checkpoint
        from minillama.sharded import read_weights  # torch.distributed.checkpoint takes 0.7 s to import

        return read_weights(Path(path) / SHARDED_DIR, expected, device)
    require_regular_file(weights_path, f"a checkpoint's {WEIGHTS_FILE}")
    if weights_path.is_symlink() and not weights_path.exists():
        raise MiniLlamaError(f"{weights_path} is a symbolic link to {os.readlink(weights_path)}, which does not exist; "
                             "point it at the weights, or use another checkpoint")
    try:
        state = load_file(str(weights_path), device=str(device))
    except FileNotFoundError:
        raise MiniLlamaError(f"{path} has no {WEIGHTS_FILE} (nor {SHARDED_DIR}/); the checkpoint is incomplete") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise MiniLlamaError(f"{weights_path} cannot be read ({exc.strerror}); check that it is a file you may read") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise MiniLlamaError(f"{weights_path} cannot be read ({exc}); the file is truncated or not safetensors") from None
    check_stored_tensors(weights_path, {key: (tensor.shape, tensor.dtype) for key, tensor in state.items()}, expected)
    return state


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[Transformer, Checkpoint]:
    """Build the model a checkpoint describes, its parameters float32 on `device` unless the caller casts them.

    The structure is built without memory (meta device) and the tensors read from the file become its parameters
    (`assign`), so the weights are held once, never twice."""
    info = read_checkpoint_info(path)
    model = meta_model(info.config)
    state = _read_checked_weights(info.path, model, device)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not info.config.tie_embeddings, assign=True)
    if info.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # the head was stored once, as the embedding
    # Buffers are not stored; compute them on the real device.
    cos, sin = rotary_tables(info.config.head_dim, info.config.max_seq_len, info.config.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model, info


def load_checkpoint_tokenizer(info: Checkpoint, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer stored in the checkpoint, unless the user names another; checked against the model."""
    from minillama.tokenizer import load_tokenizer

    if not override and info.tokenizer_path is None and info.tokenizer_fingerprint not in (None, LLAMA2_TOKENIZER_SHA256):
        raise ArgumentError("{checkpoint_dir} has no tokenizer.model, and its model was trained with another tokenizer "
                            "than Llama 2's (vocabulary {vocab}); pass {tokenizer} PATH to the tokenizer.model it was trained with",
                            checkpoint_dir=info.path, vocab=info.config.vocab_size)
    tokenizer = load_tokenizer(override) if override or info.tokenizer_path is None else Tokenizer(info.tokenizer_path)
    check_vocab(tokenizer, info.config.vocab_size, f"checkpoint {info.path}", "pass the tokenizer the model was trained with")
    return tokenizer


def load_for_inference(path: str | Path, device: str = "auto", dtype: str = "auto",
                       tokenizer: str | Path | None = None) -> tuple[Transformer, Tokenizer, Checkpoint]:
    """A checkpoint (or a run directory's newest) ready to sample from or evaluate: on `device`, in eval mode, its
    weights in `dtype` (see `minillama.device.inference_dtype`), with its tokenizer (or `tokenizer`, checked)."""
    from minillama.device import inference_dtype, pick_device

    torch_device = pick_device(device)
    model, info = load_checkpoint(find_checkpoint(Path(path)), torch_device)
    loaded_tokenizer = load_checkpoint_tokenizer(info, tokenizer)
    broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if broken:
        raise MiniLlamaError(f"{info.path} has NaN or infinite weights (first in '{broken}'): the run diverged or the file "
                             "is damaged; use an earlier checkpoint")
    return model.to(inference_dtype(torch_device, dtype)).eval(), loaded_tokenizer, info


def is_checkpoint(path: Path) -> bool:
    """A directory holding a Mini Llama checkpoint (its config.json names the format)."""
    try:
        read_checkpoint_info(Path(path))
    except MiniLlamaError:
        return False
    return True
