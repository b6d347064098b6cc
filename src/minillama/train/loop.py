"""The training run: build-nanogpt's recipe for a Llama, on one device or many, resumable at any checkpoint."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minillama.config import to_dict
from minillama.data.loader import TrainLoader
from minillama.data.ready import ready_data, ready_tokenizer
from minillama.data.shards import read_manifest
from minillama.device import autocast, autocast_dtype, peak_flops, pick_device
from minillama.distributed import Distributed, all_reduce_mean, any_rank, barrier, close_distributed, init_distributed
from minillama.errors import MiniLlamaError, TrainingStopped
from minillama.files import DirectoryLock, remove_leftovers
from minillama.layout import CHECKPOINTS_DIR, complete_checkpoints
from minillama.metrics import MetricsLogger, truncate_metrics
from minillama.model import Transformer
from minillama.summary import count_parameters, training_flops_per_token
from minillama.train import history, monitor, plan
from minillama.train.config import TrainConfig
from minillama.train.memory import check_model_fits, full_step_accumulation, gradient_accumulation_steps
from minillama.train.micro_batch import estimated_micro_batch, tried_micro_batch, with_micro_batch
from minillama.train.optim import build_optimizer, set_learning_rates, zero_output_projections
from minillama.train.parallel import clip_gradients, gradient_sync, parallelize
from minillama.train.preflight import check_run_paths
from minillama.train.resume import checkpoint_to_resume, restore_run, save_run
from minillama.train.run import Run, RunState


def train(config: TrainConfig, resume: str = "auto") -> dict[str, Any]:
    """Run (or continue) training as `config` says; returns the last step's metrics. Under torchrun, every
    process calls this."""
    check_run_paths(config)
    ctx = init_distributed(config.device, alone_as_group=config.parallel == "fsdp")
    try:
        done = history.finished_step(Path(config.run_dir), config, resume)
        if done is not None:
            if ctx.is_main:
                print(f"{config.run_dir} is complete: its newest checkpoint holds {done:,} of {config.last_step:,} steps; nothing "
                      f"to train (raise optim.max_steps or stop_at_step to go on, or choose another run_dir)\n"
                      + history.next_commands(config))
            return {}
        result = _train_and_free(config, resume, ctx)
        barrier(ctx)  # no rank tears down its connections while another still uses them
        if ctx.is_main:
            final = complete_checkpoints(Path(config.run_dir))[-1]
            print(f"finished {config.last_step:,} of {config.optim.max_steps:,} steps; final checkpoint {final}\n"
                  + history.next_commands(config))
        return result
    finally:
        close_distributed(ctx)


def _train_and_free(config: TrainConfig, resume: str, ctx: Distributed) -> dict[str, Any]:
    """Open the run and train it, then free it before the process group goes: DDP's reducer holds the group, and a
    group freed last by the reducer is torn down while its worker thread may still need the GIL the freeing thread
    holds (a deadlock seen in gloo). An exception's traceback would keep the run alive, so its frames are cleared."""
    run = None
    try:
        with open_run(config, resume, ctx) as run:
            return _train(run)
    except BaseException as exc:
        run = None
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        del run
        gc.collect()  # modules and hooks refer to each other: free the cycles now, not at some later collection


def _train(run: Run) -> dict[str, Any]:
    """build-nanogpt's recipe: evaluate every eval.interval steps, one optimizer step over total_tokens at a
    time, a checkpoint every checkpoint.interval steps; evaluate once more after the last step. SIGTERM or
    Ctrl-C ends the run after the step in flight, with a checkpoint of it."""
    config, state = run.config, run.state
    last: dict[str, Any] = {}
    run.logger.say(plan.plan_line(config, state.step))
    # Where this session starts: a report counts wall time within sessions, not the hours a run stood stopped.
    run.logger.bookkeep({"kind": "session", "step": state.step, "planned_steps": config.last_step, "time": time.time()})
    time_left = plan.TimeLeft(state.step, config)
    with StopSignals() as signals:
        while state.step < config.last_step:
            if state.step % config.eval.interval == 0:
                monitor.evaluate_and_sample(run)
            last = train_step(run)
            _log_step(run, last)
            state.step += 1
            if time_left.timed(state.step, last["tokens_per_s"]):
                run.logger.say(time_left.line(state.step))
            stopping = any_rank(signals.received is not None, run.ctx, run.device)
            if stopping or state.step % config.checkpoint.interval == 0 or state.step == config.last_step:
                save_run(run)
            if stopping:
                raise TrainingStopped(signals.received or signal.SIGTERM, state.step, complete_checkpoints(Path(config.run_dir))[-1])
    monitor.evaluate_and_sample(run)
    run.logger.close()
    return last


class StopSignals:
    """SIGTERM (what SLURM preemption and spot reclaims send) and SIGINT (Ctrl-C) become a request to stop after
    the step in flight, so that at most that step is lost. A second Ctrl-C stops at once."""

    received: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step: `accumulation` micro-batches, gradients averaged across ranks once, clipped, applied."""
    config, device = run.config, run.device
    started = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    tokens = config.batch.tokens_at(run.state.step)
    accumulation = gradient_accumulation_steps(tokens, config.batch.micro_batch, config.batch.seq_len, run.ctx.world_size)
    run.loader.set_step_windows(tokens // config.batch.seq_len)
    for micro_step in range(accumulation):
        x, y = (t.to(device, non_blocking=True) for t in next(run.loader))
        with gradient_sync(run.step_model, sync=micro_step == accumulation - 1):
            with autocast(device, run.precision):
                _, loss = run.step_model(x, y)
            loss = loss / accumulation  # the gradient of the mean over all micro-batches
            loss_sum += loss.detach()
            run.scaler.scale(loss).backward()
    all_reduce_mean(loss_sum, run.ctx)

    run.scaler.unscale_(run.optimizer)
    # Clipping at 1.0 bounds the update when a rare batch produces a huge gradient (common early on).
    grad_norm = clip_gradients(run.model, config.optim.grad_clip or math.inf)
    lr = set_learning_rates(run.optimizer, run.state.step, config.optim)
    if torch.isfinite(loss_sum) and (torch.isfinite(grad_norm) or run.scaler.is_enabled()):
        run.scaler.step(run.optimizer)
    else:
        _on_nonfinite(config, run.state.step, loss_sum.item(), grad_norm.item(), Path(config.run_dir))
        run.optimizer.zero_grad(set_to_none=True)  # skip: no update from this batch
    run.scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"kind": "train", "step": run.state.step, "loss": loss_sum.item(), "lr": lr, "grad_norm": grad_norm.item(),
            "tokens": tokens, "step_time_s": time.perf_counter() - started}


def _log_step(run: Run, record: dict[str, Any]) -> None:
    config, state = run.config, run.state
    state.tokens_seen += record["tokens"]
    tokens_per_s = record["tokens"] / record["step_time_s"]
    record.update(tokens_seen=state.tokens_seen, tokens_per_s=tokens_per_s, time=time.time())
    if run.device.type == "cuda":
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(run.device)  # since the run began, this rank
    peak = peak_flops(run.device)
    if peak:
        record["mfu"] = training_flops_per_token(config.model, config.batch.seq_len) * tokens_per_s / (peak * run.ctx.world_size)
    run.logger.log(record, f"step {record['step']:6d} | loss {record['loss']:.6f} | lr {record['lr']:.4e} | "
                           f"norm {record['grad_norm']:.4f} | dt {record['step_time_s'] * 1000:.1f}ms | tok/s {tokens_per_s:,.0f}"
                           + (f" | mfu {record['mfu']:.1%}" if "mfu" in record else ""))


@contextlib.contextmanager
def open_run(config: TrainConfig, resume: str, ctx: Distributed) -> Iterator[Run]:
    """Device, tokenizer, data, model, optimizer, loader and logger for `config`, restored from the run directory's
    newest checkpoint when resuming. Everything is read and built first; only then is the run directory written,
    under a lock rank 0 holds for as long as the run lasts."""
    device = pick_device(config.device, ctx.local_rank)
    precision = autocast_dtype(device, config.dtype)
    if config.parallel == "fsdp" and precision == torch.float16:
        raise MiniLlamaError(f"parallel = fsdp trains in bfloat16 or float32, and dtype {config.dtype} is float16 on {device}; "
                             "use --set dtype=float32 (or parallel=ddp, which has a gradient scaler for float16)")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (outside autocast) on TF32 tensor cores
    elif config.threads:
        torch.set_num_threads(config.threads)  # PyTorch's threads spin between operations, stealing a busy machine's cores
    choice = estimated_micro_batch(config, device, precision, ctx) if config.batch.micro_batch == "auto" else None
    config = with_micro_batch(config, choice.micro_batch) if choice else config
    run_dir = Path(config.run_dir)
    checkpoint = checkpoint_to_resume(run_dir, resume)  # a resume that cannot work is refused before any work
    if checkpoint is not None:
        history.check_resume_config(run_dir, config)  # refuses a meaningless resume now, before any work

    tokenizer = ready_tokenizer(config.data, config.model.vocab_size, ctx)
    data_dir = ready_data(config.data, tokenizer, config.model.vocab_size, ctx, device)

    check_model_fits(config.model, config.parallel, device, ctx.world_size, config.optim.name)
    torch.manual_seed(config.seed)  # identical initial weights on every rank (FSDP then keeps each rank's slice)
    model = Transformer(config.model).to(device)
    if config.zero_init_projections:
        zero_output_projections(model)
    compile_model = config.compile is True or (config.compile == "auto" and device.type == "cuda")
    # `compiled` serves training steps and validation loss (fixed shapes); sampling and HellaSwag, whose shapes
    # change with every prompt, use `model`, which shares its weights, so they never trigger recompilation.
    compiled, step_model = parallelize(model, config.parallel, config.activation_checkpointing, compile_model, precision, device, ctx)
    if choice:
        choice = tried_micro_batch(choice, config, step_model, device, precision, ctx)
        config = with_micro_batch(config, choice.micro_batch)
        if ctx.is_main:
            print(choice.describe())
    changes = history.check_resume_config(run_dir, config) if checkpoint is not None else {}
    accumulation = full_step_accumulation(config.batch, ctx.world_size)
    optimizer = build_optimizer(model, config.optim, device)  # after parallelize: FSDP replaces the parameters
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    loader = TrainLoader(data_dir, config.batch.micro_batch, config.batch.seq_len, ctx.rank, ctx.world_size, config.seed,
                         windows_per_step=config.batch.total_tokens // config.batch.seq_len)
    torch.manual_seed(config.seed + ctx.rank)  # dropout masks differ across ranks
    hellaswag = monitor.load_hellaswag(config.eval, ctx, device) if config.eval.hellaswag else None
    run = Run(config, ctx, device, precision, tokenizer, data_dir, accumulation, model, compiled, step_model,
              optimizer, scaler, loader, MetricsLogger(run_dir, False, config.last_step, 0), RunState(), hellaswag,  # logs once locked
              choice)
    if checkpoint is not None:
        restore_run(checkpoint, run)

    with DirectoryLock(run_dir, "training run") if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            for folder in (run_dir, run_dir / CHECKPOINTS_DIR):  # what a run killed mid-save left behind
                remove_leftovers(folder)
            line = history.keep_config_history(run_dir, config, run.state.step, changes)
            if line:
                print(line)
            truncate_metrics(run_dir, run.state.step)
        run.logger = _logger(run)
        yield run


def _logger(run: Run) -> MetricsLogger:
    """The run's metrics log; a new run's first record describes it."""
    config, ctx, state = run.config, run.ctx, run.state
    logger = MetricsLogger(run.run_dir, ctx.is_main, config.last_step, state.step, config.log.tensorboard, config.log.wandb,
                           config.log.wandb_project, to_dict(config))
    if ctx.is_main and state.step == 0:
        parameters = count_parameters(config.model)["total"]
        logger.log({"kind": "run", "step": 0, "parameters": parameters, "model_preset": config.model_preset,
                    "vocab_size": config.model.vocab_size, "tokenizer": run.tokenizer.path.name, "world_size": ctx.world_size,
                    "tokenizer_sha256": run.tokenizer.fingerprint, "data_source": read_manifest(run.data_dir)["source"],
                    "device": str(run.device), "accumulation": run.accumulation, "tokens_per_step": config.batch.total_tokens,
                    "cpu_threads": torch.get_num_threads(), "micro_batch": config.batch.micro_batch,
                    **({"micro_batch_estimate_bytes": run.micro_batch_choice.estimate_bytes,
                        "micro_batch_budget_bytes": run.micro_batch_choice.budget_bytes} if run.micro_batch_choice else {})},
                   f"training {config.model_preset} ({parameters:,} parameters) on {ctx.world_size} x {run.device}, "
                   f"{config.batch.total_tokens:,} tokens per step ({run.accumulation} micro-steps of "
                   f"{config.batch.micro_batch} x {config.batch.seq_len} per rank)")
    return logger


def _on_nonfinite(config: TrainConfig, step: int, loss: float, grad_norm: float, run_dir: Path) -> None:
    if config.on_nonfinite == "skip":
        print(f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; skipping this step")
        return
    saved = complete_checkpoints(run_dir)
    keep = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
    raise MiniLlamaError(
        f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; stopped ({keep}). Resume with a lower "
        "optim.lr, or --set on_nonfinite=skip to skip such steps"
    )
