"""Training checkpoints: the model checkpoint plus everything needed to continue exactly where a run stopped.

RUN_DIR/checkpoints/step_NNNNNNN/ holds config.json, model.safetensors, tokenizer.model and training_state.pt,
written atomically. Each part of a run saves and loads itself through `state_dict`/`load_state_dict` (the
RunState, data loader, gradient scaler and optimizer) and training_state.pt holds what they return, with every
rank's RNG state. An FSDP run writes weights and optimizer state sharded instead (the `sharded/` folder, every
rank its part), which any number of ranks can read back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from minillama.checkpoint import fill_checkpoint, load_weights, save_checkpoint, unwritable_checkpoint
from minillama.config import to_dict
from minillama.distributed import Distributed, barrier, broadcast_object, gather_objects
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import commit_directory, temporary_directory
from minillama.layout import SHARDED_DIR, TRAINING_STATE_FILE, checkpoint_dir, complete_checkpoints
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer
from minillama.train.optim import MuonWithAdamW, load_optimizer_state
from minillama.train.parallel import is_sharded
from minillama.train.run import Run


def checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run starts from as `resume` ("auto", "always" or "never") asks, refusing one that cannot work."""
    saved = complete_checkpoints(run_dir)
    if resume == "never" and saved:
        raise ArgumentError("{folder} already holds checkpoints; use {resume} to continue it, or choose another run_dir",
                            folder=run_dir)
    if resume == "always" and not saved:
        raise ArgumentError("{resume}: {folder} holds no complete checkpoint to resume from", folder=run_dir)
    return saved[-1] if saved and resume != "never" else None


def save_run(run: Run) -> Path:
    """A checkpoint of the run at its current step (all ranks must call this; rank 0 writes all but FSDP's shards)."""
    config, state = run.config, run.state
    rng = gather_objects(rng_state(run.device), run.ctx)
    training_state = {"scaler": run.scaler.state_dict(), "loader": run.loader.state_dict(), "rng": rng, **state.state_dict()}
    metadata = {"step": state.step, "run_dir": config.run_dir, "data_dir": str(Path(config.data.dir).resolve()),
                "model_preset": config.model_preset,
                "tokens_seen": state.tokens_seen, "eval_prompts": list(config.eval.prompts),
                "run_config": to_dict(config)}  # how it was trained (every option), beside config.toml's history
    path = checkpoint_dir(run.run_dir, state.step)
    if is_sharded(run.model):
        save_sharded_checkpoint(path, run.model, run.optimizer, run.tokenizer, training_state, metadata, run.ctx)
    elif run.ctx.is_main:
        save_checkpoint(path, run.model, run.tokenizer, metadata=metadata,
                        training_state={"optimizer": run.optimizer.state_dict(), **training_state})
    if run.ctx.is_main:
        _keep_last(run.run_dir, config.checkpoint.keep_last, path)
    barrier(run.ctx)
    return path


def restore_run(path: Path, run: Run) -> None:
    """Continue `run` from the checkpoint at `path`: weights, optimizer, scaler, data position, step and RNG."""
    saved = load_training_state(path)
    if (path / SHARDED_DIR).is_dir() != is_sharded(run.model):
        written, now = ("fsdp", "ddp") if (path / SHARDED_DIR).is_dir() else ("ddp", "fsdp")
        raise MiniLlamaError(f"{path} was written by a parallel = {written} run; resume it with --set parallel={written} "
                             f"(this run has {now}), or start another run_dir")
    if is_sharded(run.model):
        load_sharded_checkpoint(path, run.model, run.optimizer)
    else:
        load_weights(path, run.model)
        load_optimizer_state(run.optimizer, saved["optimizer"], run.model)
    notes = []
    if bool(saved["scaler"]) == run.scaler.is_enabled():  # an fp16 run saves its gradient scaler; other runs have none
        run.scaler.load_state_dict(saved["scaler"])
    else:
        notes.append("the precision changed, so the fp16 gradient scaler starts afresh")
    run.loader.load_state_dict(saved["loader"])
    run.state.load_state_dict(saved)
    ctx = run.ctx
    if len(saved["rng"]) == ctx.world_size:
        set_rng_state(saved["rng"][ctx.rank], run.device)
    else:
        notes.append(f"it was saved by {len(saved['rng'])} ranks and runs on {ctx.world_size}, so random states (dropout) "
                     "start from the seed; the data order continues exactly")
    if ctx.is_main:
        print(f"resumed from {path} at step {run.state.step}" + "".join(f"; {note}" for note in notes))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_sharded_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer | MuonWithAdamW, tokenizer: Tokenizer,
                            training_state: dict[str, Any], metadata: dict[str, Any], ctx: Distributed) -> None:
    """Every rank writes its shards of weights and optimizer state into one temporary directory, rank 0 the index
    and the rest; rank 0 renames it into place once all is written (all ranks must call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from minillama.sharded import first_failure

    tmp = broadcast_object(temporary_directory(path) if ctx.is_main else None)
    try:
        weights, optim = _state_dicts(model, optimizer)
        try:
            dcp.save({"model": weights, "optimizer": optim["state"]}, storage_writer=dcp.FileSystemWriter(tmp / SHARDED_DIR))
        except CheckpointException as exc:  # every rank gets every rank's failure
            raise unwritable_checkpoint(path, first_failure(exc)) from None
        if ctx.is_main:
            fill_checkpoint(tmp, path, model.config, tokenizer, metadata, training_state, None)
            commit_directory(tmp, path)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_sharded_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer | MuonWithAdamW) -> None:
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
