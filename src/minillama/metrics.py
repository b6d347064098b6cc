"""Where training reports go: the console (a progress bar on a terminal, plain lines otherwise),
RUN_DIR/metrics.jsonl (one JSON object per line, the source for plots and reports), and optionally TensorBoard
and Weights & Biases. Only rank 0 logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minillama.errors import MiniLlamaError
from minillama.files import write_file_atomically
from minillama.layout import METRICS_FILE, TENSORBOARD_DIR, metrics_path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a partly written last line (from a crash) or any line that is not a
    record is ignored."""
    path = metrics_path(run_dir)
    if not path.is_file():
        raise MiniLlamaError(f"{run_dir} has no {METRICS_FILE}; is it a training run directory?")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        # Only what a run writes: a dict with a kind and an integer step (garbage lines are skipped, not fatal).
        if isinstance(record, dict) and isinstance(record.get("kind"), str) and type(record.get("step")) is int:
            records.append(record)
    return records


def truncate_metrics(run_dir: Path, resume_step: int) -> None:
    """Drop records of steps >= `resume_step`: the resumed run logs those steps again."""
    path = metrics_path(run_dir)
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r["step"] < resume_step]
        write_file_atomically(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "minillama", config: dict | None = None):
        self.enabled = enabled
        self.bar = None
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(metrics_path(run_dir), "a", buffering=1)
        if sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MiniLlamaError("log.tensorboard is on but the tensorboard package is missing: pip install tensorboard") from None
            self.tensorboard = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise MiniLlamaError("log.wandb is on but the wandb package is missing: pip install wandb") from None
            self.wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def bookkeep(self, record: dict[str, Any]) -> None:
        """Write a record to metrics.jsonl alone: bookkeeping that no curve or console line shows."""
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")

    def log(self, record: dict[str, Any], line: str) -> None:
        """Write one record (kind, step, values) to every sink, and `line` to the console."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.write(line)
            if record["kind"] == "train":
                self.bar.update(record["step"] + 1 - self.bar.n)
        else:
            print(line, flush=True)
        numbers = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def say(self, line: str) -> None:
        """A line for the console alone (above the progress bar), from rank 0."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
