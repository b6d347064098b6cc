"""What a run directory says about the runs made in it: a changed config on resume, a run already complete, and
the commands that use a finished run."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from minillama.checkpoint import Checkpoint, read_checkpoint_info
from minillama.config import to_dict
from minillama.errors import MiniLlamaError
from minillama.layout import complete_checkpoints, metrics_path, replaced_run_config_path, run_config_path, run_dir_of
from minillama.metrics import read_metrics
from minillama.train.config import TrainConfig, config_to_toml, load_train_config

# Fields a resume must keep: the checkpoint's weights, optimizer state and data position only mean something
# for the same model, tokenizer and batch arithmetic; ddp and fsdp store optimizer state in different formats.
FIXED_ON_RESUME = ("model.", "model_preset", "data.tokenizer", "data.dir", "batch.total_tokens", "batch.seq_len", "batch.stages", "optim.name",
                   "parallel")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(run_dir: Path, config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (before, now)} between the run directory's saved config.toml and `config`."""
    saved = run_config_path(run_dir)
    if not saved.is_file():
        return {}
    before, now = _flat(to_dict(load_train_config(saved))), _flat(to_dict(config))
    return {key: (before.get(key), now.get(key)) for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)}


def check_resume_config(run_dir: Path, config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The changed fields of a resumed run, after refusing changes that would make the resume meaningless."""
    changes = config_changes(run_dir, config)
    fixed = {key: change for key, change in changes.items() if key.startswith(FIXED_ON_RESUME)}
    if fixed:
        key, (before, now) = next(iter(fixed.items()))
        raise MiniLlamaError(
            f"{run_dir} was trained with {key} = {before!r}, this config gives {now!r}: a resume must keep the model, "
            "tokenizer, data, batch (total_tokens, seq_len, stages), optimizer and parallel; use another run_dir for a new run"
        )
    return changes


def keep_config_history(run_dir: Path, config: TrainConfig, step: int, changes: dict[str, tuple[Any, Any]]) -> str:
    """Write config.toml for this run, keeping a changed earlier one as config.before_step_N.toml; a line to print."""
    saved = run_config_path(run_dir)
    line = ""
    if changes:
        kept = replaced_run_config_path(run_dir, step)
        saved.replace(kept)
        line = (f"resuming at step {step:,} with a changed config: "
                + "; ".join(f"{key} {before!r} -> {now!r}" for key, (before, now) in changes.items())
                + f" (the earlier config is kept as {kept.name})")
    saved.write_text(config_to_toml(config))
    return line


def data_dir_of(checkpoint: Path) -> Path | None:
    """The prepared data a checkpoint's run trained on (its config.toml's data.dir), or None outside a run."""
    run_dir = run_dir_of(checkpoint)
    if run_dir is None or not run_config_path(run_dir).is_file():
        return None
    recorded = read_checkpoint_info(checkpoint).metadata.get("data_dir")  # absolute, as training resolved it
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    data_dir = Path(load_train_config(run_config_path(run_dir)).data.dir)
    if not data_dir.is_absolute() and not data_dir.is_dir():
        raise MiniLlamaError(f"the run's data.dir {data_dir} is relative to the folder training ran in, and is not here "
                             f"({Path.cwd()}); run from that folder, or pass --data DIR")
    return data_dir


def training_summary(info: Checkpoint) -> dict[str, Any]:
    """What `inspect` shows of a training checkpoint: its step and tokens seen, the run's last validation loss up to
    that step (from metrics.jsonl, when the checkpoint sits in its run), and the recipe it was trained with."""
    metadata = info.metadata
    summary: dict[str, Any] = {key: metadata[key] for key in ("step", "tokens_seen") if key in metadata}
    run_dir = run_dir_of(info.path)
    if run_dir is not None and metrics_path(run_dir).is_file():
        evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float))
                 and r.get("step", 0) <= metadata.get("step", 0)]
        if evals:
            summary["last_val_loss"] = {"step": evals[-1]["step"], "val_loss": evals[-1]["val_loss"]}
    recipe = metadata.get("run_config")
    if isinstance(recipe, dict):
        optim, batch = recipe.get("optim", {}), recipe.get("batch", {})
        summary["recipe"] = {"optimizer": optim.get("name"), "schedule": optim.get("schedule"), "lr": optim.get("lr"),
                             "max_steps": optim.get("max_steps"), "tokens_per_step": batch.get("total_tokens"),
                             "seq_len": batch.get("seq_len"), "dtype": recipe.get("dtype"), "parallel": recipe.get("parallel")}
    return summary


def newest_step(run_dir: Path) -> int | None:
    """The step of the run's newest complete checkpoint, or None before its first."""
    saved = complete_checkpoints(run_dir)
    return read_checkpoint_info(saved[-1]).metadata.get("step", 0) if saved else None


def finished_step(run_dir: Path, config: TrainConfig, resume: str) -> int | None:
    """The step of the newest checkpoint when it already reaches the config's last step (nothing to train)."""
    step = None if resume == "never" else newest_step(run_dir)
    return step if step is not None and step >= config.last_step else None


def next_commands(config: TrainConfig) -> str:
    """How to use a finished run offline: sample, evaluate, plot, export. HellaSwag only for a run on FineWeb-Edu
    (a model of a small corpus scores chance), from its local file when the config names one."""
    run = shlex.quote(config.run_dir)
    prompt = shlex.quote(config.eval.prompts[0] if config.eval.prompts else "Once upon a time")
    evaluate = f"minillama eval loss {run}"
    if config.eval.hellaswag_file:
        evaluate += f"   |   minillama eval hellaswag {run} --data {shlex.quote(config.eval.hellaswag_file)}"
    elif config.data.source == "fineweb-edu":
        evaluate += f"   |   minillama eval hellaswag {run}  (downloads the validation file once)"
    return (f"  sample:   minillama generate {run} {prompt}\n"
            f"  evaluate: {evaluate}\n"
            f"  curves:   minillama plot {run} -o {shlex.quote(str(Path(config.run_dir) / 'curves.png'))}   |   "
            f"minillama report {run}\n"
            f"  export:   minillama export gguf {run} {shlex.quote(str(Path(config.run_dir) / 'model.gguf'))}   |   "
            f"minillama export hf {run} {shlex.quote(str(Path(config.run_dir) / 'hf'))}")
