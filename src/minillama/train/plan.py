"""How long a run is and will take: the plan printed before the first step, the time left once steps have been
measured, and `minillama train --dry-run`'s summary (memory per rank, batch arithmetic, FLOPs, time)."""

from __future__ import annotations

import datetime
import os
import statistics
from pathlib import Path

import torch

from minillama.device import autocast_dtype, memory_bytes, peak_flops, pick_device
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.summary import count_parameters, training_flops_per_token
from minillama.train.config import TrainConfig
from minillama.train import history
from minillama.train.memory import OPTIMIZER_STATE, MicroBatchChoice, full_step_accumulation, training_bytes_per_rank
from minillama.train.micro_batch import estimate_for_ranks, with_micro_batch
from minillama.train.preflight import check_run_paths

MEASURED_STEPS = 5  # steps timed before the time left is told (the first, which compiles, is not one of them)


def abbreviated(n: float) -> str:
    """A count as people say it: 10.0B, 524.3M, 8.2k (tokens, FLOPs)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def plan_line(config: TrainConfig, start_step: int) -> str:
    """What is left of the run, before its first step."""
    steps, batch = config.last_step - start_step, config.batch
    total = batch.tokens_between(start_step, config.last_step)
    staged = [f"{tokens:,} before step {until:,}" for until, tokens in batch.stages if until > start_step]
    stages = f" ({', '.join(staged)})" if staged else ""
    return (f"plan: {abbreviated(total)} tokens in {steps:,} steps of {batch.total_tokens:,}{stages} (steps {start_step:,} to "
            f"{config.last_step - 1:,} of {config.optim.max_steps:,})")


class TimeLeft:
    """Times the steps after a run's first (which compiles), and is ready to tell the time left once MEASURED_STEPS
    are timed, if steps remain."""

    def __init__(self, first_step: int, config: TrainConfig):
        self.first_step, self.config = first_step, config
        self.speeds: list[float] = []  # tokens per second

    def timed(self, step: int, tokens_per_s: float) -> bool:
        """Take the speed of the step that ended at `step`; True when the time left is ready to tell."""
        if step <= self.first_step + 1 or len(self.speeds) == MEASURED_STEPS:
            return False
        self.speeds.append(tokens_per_s)
        return len(self.speeds) == MEASURED_STEPS and step < self.config.last_step

    def line(self, step: int) -> str:
        """The time left at the median speed of the timed steps, and when the run will be done."""
        speed, steps_left = statistics.median(self.speeds), self.config.last_step - step
        left = self.config.batch.tokens_between(step, self.config.last_step) / speed
        finish = datetime.datetime.now() + datetime.timedelta(seconds=left)
        return (f"at {abbreviated(speed)} tok/s (median of {len(self.speeds)} steps) the "
                f"{steps_left:,} steps left take about {duration(left)}: done around {finish:%Y-%m-%d %H:%M}")


def dry_run(config: TrainConfig, tokens_per_s: float | None = None) -> str:
    """What `minillama train --dry-run` prints: the run's plan on this machine (its device, its memory, the ranks
    torchrun gives it), from arithmetic alone. Reads the run directory (to continue its newest checkpoint) and writes
    nothing."""
    if tokens_per_s is not None and not tokens_per_s > 0:  # NaN too
        raise ArgumentError("{tokens_per_s} is {value}; expected a positive speed in tokens per second", value=tokens_per_s)
    check_run_paths(config)
    device = pick_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    choice = None
    if config.batch.micro_batch == "auto":
        choice = estimate_for_ranks(config, device, autocast_dtype(device, config.dtype), ranks)
        config = with_micro_batch(config, choice.micro_batch)
    start = history.newest_step(Path(config.run_dir)) or 0
    float32 = autocast_dtype(device, config.dtype) is None
    plan = summary(config, ranks, choice, memory_bytes(device), start, tokens_per_s, peak_flops(device), float32)
    return plan + fit_verdict(config, device, ranks, choice)


def fit_verdict(config: TrainConfig, device: torch.device, ranks: int, choice: MicroBatchChoice | None) -> str:
    """A last line when the estimate does not fit the device's memory: say so, and what micro_batch "auto" would
    choose (a run with micro_batch "auto" has already chosen)."""
    memory = memory_bytes(device)
    parts = training_bytes_per_rank(config.model, config.parallel, ranks, config.batch.micro_batch, config.batch.seq_len,
                                    config.activation_checkpointing, full_step_accumulation(config.batch, ranks),
                                    config.optim.name)
    float32 = autocast_dtype(device, config.dtype) is None  # activations at twice their bf16 size, as `summary` counts them
    if choice is not None or memory is None or parts["total"] + (parts["activations"] if float32 else 0) <= memory:
        return ""
    try:
        auto = estimate_for_ranks(config, device, autocast_dtype(device, config.dtype), ranks)
    except MiniLlamaError as exc:  # not even a micro-batch of 1 fits
        return f"\nverdict: does not fit this device ({exc})"
    return (f"\nverdict: does not fit this device's {memory / 2**30:,.1f} GiB; --set batch.micro_batch=auto would choose "
            f"{auto.micro_batch} ({auto.accumulation} micro-steps per step)")


def summary(config: TrainConfig, ranks: int, choice: MicroBatchChoice | None, memory: int | None, start_step: int,
            tokens_per_s: float | None, peak_flops: float | None, float32: bool = False) -> str:
    """The whole plan of a run, from arithmetic alone (`float32`: trained without autocast, as on a CPU)."""
    batch = config.batch
    accumulation = full_step_accumulation(batch, ranks)  # refuses what training would refuse
    flops = training_flops_per_token(config.model, batch.seq_len)
    parts = training_bytes_per_rank(config.model, config.parallel, ranks, batch.micro_batch, batch.seq_len,
                                    config.activation_checkpointing, accumulation, config.optim.name)
    if float32:  # activations at twice their bf16 size
        parts["total"] += parts["activations"]
        parts["activations"] *= 2
    lines = [
        f"model: {config.model_preset}, {count_parameters(config.model)['total']:,} parameters, {abbreviated(flops)} FLOPs per "
        f"token to train (6 per weight, plus attention at seq_len {batch.seq_len})",
        f"batch: {batch.total_tokens:,} tokens per step = {ranks} {'rank' if ranks == 1 else 'ranks'} x {accumulation} micro-steps "
        f"x micro_batch {batch.micro_batch} x seq_len {batch.seq_len}" + (f" ({choice.describe()})" if choice else ""),
        f"memory per rank (estimate: {OPTIMIZER_STATE[config.optim.name]}, {'float32' if float32 else 'bf16 autocast'}): "
        + ", ".join(f"{k} {v / 2**30:,.2f} GiB" for k, v in parts.items())
        + (f"; the device reports {memory / 2**30:,.1f} GiB" if memory else ""),
        plan_line(config, start_step) + (", continuing the run's newest checkpoint" if start_step else ""),
    ]
    speed, how = (tokens_per_s, "at the given speed") if tokens_per_s else (
        (0.4 * peak_flops * ranks / flops, "at 40% of this GPU's peak bf16 FLOPs") if peak_flops else (None, ""))
    if speed:
        lines.append(f"time: about {duration(batch.tokens_between(start_step, config.last_step) / speed)} at {abbreviated(speed)} "
                     f"tok/s ({how})")
    else:
        lines.append("time: pass --tokens-per-s N (e.g. a measured speed; docs/benchmarks.md has the H200's) for an estimate")
    return "\n".join(lines)
