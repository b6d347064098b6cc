"""What a training run holds while it trains: built once by `train.loop.open_run`, then used by the step, the loop,
the monitor and the checkpoint code."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillama.data.loader import TrainLoader
from minillama.distributed import Distributed
from minillama.eval.hellaswag import Example
from minillama.metrics import MetricsLogger
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer
from minillama.train.config import TrainConfig
from minillama.train.memory import MicroBatchChoice
from minillama.train.optim import MuonWithAdamW


@dataclass
class RunState:
    """What changes from step to step, besides model and optimizer; saved in every checkpoint."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float = math.inf

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen, self.best_val_loss = state["step"], state["tokens_seen"], state["best_val_loss"]


@dataclass
class Run:
    """Everything a training run holds."""

    config: TrainConfig
    ctx: Distributed
    device: torch.device
    precision: torch.dtype | None  # autocast dtype; None: float32
    tokenizer: Tokenizer
    data_dir: Path
    accumulation: int  # micro-steps per optimizer step (of batch.total_tokens, after any smaller stages)
    model: Transformer  # the weights (sharded under fsdp); sampling and HellaSwag call it directly (ddp)
    compiled: torch.nn.Module  # `model` compiled (or itself; under fsdp a plain view of the gathered weights): validation loss
    step_model: torch.nn.Module  # `compiled` under DDP (or itself): what the micro-steps call
    optimizer: torch.optim.Optimizer | MuonWithAdamW
    scaler: torch.amp.GradScaler
    loader: TrainLoader
    logger: MetricsLogger
    state: RunState
    hellaswag: list[Example] | None
    micro_batch_choice: MicroBatchChoice | None  # what batch.micro_batch = "auto" chose (config.batch holds the number)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)
