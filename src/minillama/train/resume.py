"""Training checkpoints: the model checkpoint plus everything needed to continue exactly where a run stopped.

RUN_DIR/checkpoints/step_NNNNNNN/ holds config.json, model.safetensors, tokenizer.model and training_state.pt
(step, optimizer, grad scaler, data position, every rank's RNG state), written atomically. The step number is
the number of optimizer steps completed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from minillama.checkpoint import CONFIG_FILE, TRAINING_STATE_FILE, save_checkpoint
from minillama.errors import MiniLlamaError
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer


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
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    """training_state.pt, read with weights_only=True: tensors and plain containers only, never code."""
    try:
        return torch.load(Path(path) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise MiniLlamaError(f"{path / TRAINING_STATE_FILE} cannot be loaded ({type(exc).__name__}); resume from an older checkpoint") from None
