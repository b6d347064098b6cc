"""Training checkpoints: the model checkpoint plus everything needed to continue exactly where a run stopped.

RUN_DIR/checkpoints/step_NNNNNNN/ holds config.json, model.safetensors, tokenizer.model and training_state.pt
(step, optimizer, grad scaler, data position, every rank's RNG state), written atomically. The step number is
the number of optimizer steps completed. An FSDP run writes weights and optimizer state sharded instead (the
`sharded/` folder, every rank its part), which any number of ranks can read back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from minillama.checkpoint import (
    CONFIG_FILE,
    SHARDED_DIR,
    TRAINING_STATE_FILE,
    fill_checkpoint,
    save_checkpoint,
    unwritable_checkpoint,
)
from minillama.errors import MiniLlamaError
from minillama.files import commit_directory, temporary_directory
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer
from minillama.train.distributed import Distributed, broadcast_object
from minillama.train.optim import MuonWithAdamW


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints with all their files, oldest first (a temporary directory never matches step_*)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("step_*")
             if (p / CONFIG_FILE).is_file() and (p / TRAINING_STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_checkpoint(run_dir: Path, step: int, model: Transformer, tokenizer: Tokenizer,
                             training_state: dict[str, Any], metadata: dict[str, Any], keep_last: int) -> Path:
    path = save_checkpoint(checkpoint_dir(run_dir, step), model, tokenizer, metadata={"step": step, **metadata},
                           training_state={"step": step, **training_state})
    _keep_last(run_dir, keep_last, path)
    return path


def save_sharded_training_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer | MuonWithAdamW,
                                     tokenizer: Tokenizer, training_state: dict[str, Any], metadata: dict[str, Any],
                                     keep_last: int, ctx: Distributed) -> Path:
    """Every rank writes its shards of weights and optimizer state into one temporary directory, rank 0 the index
    and the rest; rank 0 renames it into place once all is written (all ranks must call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from minillama.sharded import first_failure

    path = checkpoint_dir(run_dir, step)
    tmp = broadcast_object(temporary_directory(path) if ctx.is_main else None)
    try:
        weights, optim = _state_dicts(model, optimizer)
        try:
            dcp.save({"model": weights, "optimizer": optim["state"]}, storage_writer=dcp.FileSystemWriter(tmp / SHARDED_DIR))
        except CheckpointException as exc:  # every rank gets every rank's failure
            raise unwritable_checkpoint(path, first_failure(exc)) from None
        if ctx.is_main:
            fill_checkpoint(tmp, path, model.config, tokenizer, {"step": step, **metadata}, {"step": step, **training_state}, None)
            commit_directory(tmp, path)
            _keep_last(run_dir, keep_last, path)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_sharded_training_state(path: Path, model: Transformer, optimizer: torch.optim.Optimizer | MuonWithAdamW) -> None:
    """Weights and optimizer state from `path`'s sharded folder into an FSDP `model` on any number of ranks, each
    reading the slices it holds (all ranks must call this). Hyperparameters come from the run config, not the file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from minillama.sharded import SafeReader, check_tensors, first_failure

    weights, optim = _state_dicts(model, optimizer)  # initializes the optimizer's state, to be overwritten
    folder = Path(path) / SHARDED_DIR
    check_tensors(folder, weights, "model.")
    check_tensors(folder, {f"{key}.{name}": value for key, state in optim["state"].items() for name, value in state.items()},
                  "optimizer.")
    try:
        dcp.load({"model": weights, "optimizer": optim["state"]}, storage_reader=SafeReader(str(folder)))
    except CheckpointException as exc:
        raise MiniLlamaError(f"{folder} cannot be read ({first_failure(exc)}); resume from an older checkpoint") from None
    if model.config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]  # one parameter under two names
    set_state_dict(model, _optimizers(optimizer), model_state_dict=weights, optim_state_dict=optim)


def _optimizers(optimizer: torch.optim.Optimizer | MuonWithAdamW) -> list[torch.optim.Optimizer]:
    return [optimizer.muon, optimizer.adamw] if isinstance(optimizer, MuonWithAdamW) else [optimizer]


def _state_dicts(model: Transformer, optimizer: torch.optim.Optimizer | MuonWithAdamW) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sharded weights and optimizer state, keyed by parameter name (which is what lets another number of ranks,
    or another optimizer instance, read them back); a tied head is stored once, as the embedding."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, _optimizers(optimizer))
    if model.config.tie_embeddings:
        del weights["output.weight"]
    return weights, optim


def _keep_last(run_dir: Path, keep_last: int, newest: Path) -> None:
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path) -> dict[str, Any]:
    """training_state.pt, read with weights_only=True: tensors and plain containers only, never code."""
    try:
        return torch.load(Path(path) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise MiniLlamaError(f"{path / TRAINING_STATE_FILE} cannot be loaded ({type(exc).__name__}); resume from an older checkpoint") from None
