"""Where things live on disk, in one place: every command that reads or writes a run directory or a checkpoint asks
here, so that "the newest checkpoint" or "the metrics file" has one answer.

    RUN_DIR/
      config.toml                     the run's resolved config (config.before_step_N.toml: one a resume replaced)
      metrics.jsonl                   one JSON record per line: the source of plots and reports
      checkpoints/step_NNNNNNN/       the checkpoint after N optimizer steps (files below)
      harness/step_NNNNNNN.json       `minillama eval harness` results for that checkpoint
      tensorboard/                    with log.tensorboard

    CHECKPOINT/
      config.json                     format, model config, tokenizer fingerprint, metadata
      model.safetensors | sharded/    the weights (sharded/: an FSDP run's, in torch.distributed.checkpoint's format)
      tokenizer.model                 the SentencePiece model it was trained with
      training_state.pt               a training checkpoint's optimizer, data position and RNG
"""

from __future__ import annotations

from pathlib import Path

from minillama.errors import MiniLlamaError

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TRAINING_STATE_FILE = (
    "config.json", "model.safetensors", "tokenizer.model", "training_state.pt",
)
SHARDED_DIR = "sharded"
RUN_CONFIG_FILE, METRICS_FILE = "config.toml", "metrics.jsonl"
CHECKPOINTS_DIR, HARNESS_DIR, TENSORBOARD_DIR = "checkpoints", "harness", "tensorboard"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints, oldest first. Training writes each one whole and then renames it into place, so a
    step_* folder lacking its config.json or training_state.pt was damaged afterwards and is not offered (a
    temporary directory never matches step_*)."""
    found = [p for p in (Path(run_dir) / CHECKPOINTS_DIR).glob("step_*")
             if (p / CONFIG_FILE).is_file() and (p / TRAINING_STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def run_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_CONFIG_FILE


def replaced_run_config_path(run_dir: Path, step: int) -> Path:
    """Where a resume at `step` that changed the config keeps the earlier one."""
    return Path(run_dir) / f"config.before_step_{step}.toml"


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def is_run_dir(path: Path) -> bool:
    return metrics_path(path).is_file()


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or the newest complete checkpoint of a training run directory."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if path.name == CHECKPOINTS_DIR and is_run_dir(path.parent):  # RUN/checkpoints: the run's newest, as for RUN
        path = path.parent
    saved = complete_checkpoints(path)
    if saved:
        return saved[-1]
    if not path.exists():
        raise MiniLlamaError(f"{path} does not exist; pass a checkpoint directory or a training run directory")
    if is_run_dir(path):
        raise MiniLlamaError(f"{path} is a training run with no checkpoint yet: the first is written at the run's first "
                             "checkpoint.interval step (and when it is stopped); try again then")
    raise MiniLlamaError(f"{path} is neither a checkpoint directory (no {CONFIG_FILE}) nor a training run directory with "
                         f"{CHECKPOINTS_DIR}/step_*")


def run_dir_of(checkpoint: Path) -> Path | None:
    """The training run directory a checkpoint belongs to, or None for a checkpoint on its own."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    return run_dir if checkpoint.parent.name == CHECKPOINTS_DIR and is_run_dir(run_dir) else None


def harness_output(checkpoint: Path) -> Path | None:
    """RUN_DIR/harness/step_N.json for a checkpoint inside a training run (where `minillama report` finds it)."""
    run_dir = run_dir_of(checkpoint)
    return None if run_dir is None else run_dir / HARNESS_DIR / f"{Path(checkpoint).name}.json"


def harness_results(run_dir: Path) -> list[Path]:
    """The run's harness result files, oldest checkpoint first."""
    return sorted((Path(run_dir) / HARNESS_DIR).glob("step_*.json"))
