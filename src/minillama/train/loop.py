"""The training run: build-nanogpt's recipe for a Llama, on one device or many, resumable at any checkpoint."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillama.checkpoint import load_weights
from minillama.config import to_dict
from minillama.data.loader import TrainLoader, check_data
from minillama.data.prepare import prepare
from minillama.data.shards import read_manifest
from minillama.data.sources import FineWebEdu, LocalFiles
from minillama.errors import MiniLlamaError
from minillama.eval.loss import evaluate_loss
from minillama.model import Transformer
from minillama.summary import count_parameters, training_flops_per_token
from minillama.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from minillama.train import evaluation
from minillama.train.checkpoints import (
    complete_checkpoints, load_training_state, rng_state, save_training_checkpoint, set_rng_state,
)
from minillama.train.config import TrainConfig, config_to_toml, prepare_command
from minillama.train.device import autocast, autocast_dtype, peak_flops, pick_device
from minillama.train.distributed import (
    Distributed, all_reduce_mean, barrier, close_distributed, gather_objects, init_distributed, wrap_data_parallel,
)
from minillama.train.metrics import MetricsLogger, truncate_metrics
from minillama.train.optim import build_optimizer, learning_rate


def gradient_accumulation_steps(total_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; refuses a total batch that micro-batches cannot make up exactly."""
    per_micro_step = micro_batch * seq_len * world_size
    if total_tokens % per_micro_step == 0:
        return total_tokens // per_micro_step
    per_rank_tokens = total_tokens // world_size if total_tokens % world_size == 0 else None
    fitting = [b for b in range(1, micro_batch * 2 + 1) if per_rank_tokens and per_rank_tokens % (b * seq_len) == 0]
    nearby = max(per_micro_step, round(total_tokens / per_micro_step) * per_micro_step)
    suggestion = f"micro_batch {', '.join(map(str, fitting[-4:]))}, or " if fitting else ""
    raise MiniLlamaError(
        f"batch.total_tokens {total_tokens:,} is not a multiple of micro_batch {micro_batch} x seq_len {seq_len} x "
        f"{world_size} ranks = {per_micro_step:,}; use {suggestion}batch.total_tokens {nearby:,}"
    )


@dataclass
class RunState:
    """What changes from step to step, besides model and optimizer."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf


def train(config: TrainConfig, resume: str = "auto") -> dict[str, Any]:
    """Run (or continue) training as `config` says; returns the last step's metrics. Under torchrun, every
    process calls this."""
    ctx = init_distributed(config.device)
    try:
        result = _train(config, resume, ctx)
        barrier(ctx)  # no rank tears down its connections while another still uses them
        return result
    finally:
        close_distributed(ctx)


def _train(config: TrainConfig, resume: str, ctx: Distributed) -> dict[str, Any]:
    device = pick_device(config.device, ctx.local_rank)
    precision = autocast_dtype(device, config.dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (outside autocast) on TF32 tensor cores
    run_dir = Path(config.run_dir)

    tokenizer = _tokenizer(config, ctx)
    data_dir = _data(config, tokenizer, ctx)
    accumulation = gradient_accumulation_steps(config.batch.total_tokens, config.batch.micro_batch, config.batch.seq_len, ctx.world_size)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = Transformer(config.model).to(device)
    optimizer = build_optimizer(model, config.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    loader = TrainLoader(data_dir, config.batch.micro_batch, config.batch.seq_len, ctx.rank, ctx.world_size, config.seed)
    torch.manual_seed(config.seed + ctx.rank)  # dropout masks differ across ranks
    state = RunState()

    checkpoint = _checkpoint_to_resume(run_dir, resume)
    if checkpoint is not None:
        _restore(checkpoint, model, optimizer, scaler, loader, state, device, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_to_toml(config))
        truncate_metrics(run_dir, state.step)

    compile_model = config.compile is True or (config.compile == "auto" and device.type == "cuda")
    # `compiled` serves training steps and validation loss (fixed shapes); sampling and HellaSwag, whose shapes
    # change with every prompt, use `model`, which shares its weights, so they never trigger recompilation.
    compiled = torch.compile(model) if compile_model else model
    step_model = wrap_data_parallel(compiled, device, ctx) if ctx.enabled else compiled
    hellaswag = evaluation.load_hellaswag(config.eval) if config.eval.hellaswag else None

    flops_per_token = training_flops_per_token(config.model, config.batch.seq_len)
    peak = peak_flops(device)
    logger = MetricsLogger(run_dir, ctx.is_main, config.last_step, state.step, config.log.tensorboard, config.log.wandb,
                           config.log.wandb_project, to_dict(config))
    if ctx.is_main and state.step == 0:
        logger.log({"kind": "run", "step": 0, "parameters": count_parameters(config.model)["total"],
                    "model_preset": config.model_preset, "vocab_size": config.model.vocab_size,
                    "tokenizer": tokenizer.path.name, "world_size": ctx.world_size, "device": str(device),
                    "accumulation": accumulation, "tokens_per_step": config.batch.total_tokens},
                   f"training {config.model_preset} ({count_parameters(config.model)['total']:,} parameters) on "
                   f"{ctx.world_size} x {device}, {config.batch.total_tokens:,} tokens per step "
                   f"({accumulation} micro-steps of {config.batch.micro_batch} x {config.batch.seq_len} per rank)")

    def eval_and_sample() -> None:
        with autocast(device, precision):
            val = evaluate_loss(compiled, data_dir, tokenizer, config.batch.micro_batch, config.batch.seq_len,
                                config.eval.val_tokens, ctx.rank, ctx.world_size)
            state.best_val_loss = min(state.best_val_loss, val["loss"])
            record = {"kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen, "val_loss": val["loss"],
                      "val_bits_per_byte": val["bits_per_byte"], "val_perplexity": val["perplexity"]}
            line = f"step {state.step:6d} | val loss {val['loss']:.4f} | val bpb {val['bits_per_byte']:.4f}"
            if hellaswag:
                result = evaluation.hellaswag_accuracy(model, tokenizer, hellaswag, ctx, config.batch.micro_batch)
                record["hellaswag_acc_norm"], record["hellaswag_examples"] = result["acc_norm"], result["examples"]
                line += f" | hellaswag {result['acc_norm']:.4f} ({result['examples']} examples)"
            logger.log(record, line)
            if ctx.is_main:  # samples are for reading, not a metric: rank 0 alone, so other ranks need not wait
                samples = evaluation.samples(model, tokenizer, config.eval, seed=config.seed + state.step)
                logger.log({"kind": "samples", "step": state.step, "samples": samples},
                           "\n".join(f"  sample {i}: {s!r}" for i, s in enumerate(samples)))

    last = None
    while state.step < config.last_step:
        if state.step % config.eval.interval == 0:
            eval_and_sample()

        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accumulation):
            x, y = next(loader)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP averages gradients across ranks; do it once, after the last micro-step, not after each.
            sync = micro_step == accumulation - 1
            with step_model.no_sync() if ctx.enabled and not sync else contextlib.nullcontext():
                with autocast(device, precision):
                    _, loss = step_model(x, y)
                loss = loss / accumulation  # the gradient of the mean over all micro-batches
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        all_reduce_mean(loss_sum, ctx)

        scaler.unscale_(optimizer)
        # Clipping at 1.0 bounds the update when a rare batch produces a huge gradient (common early on).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or math.inf)
        lr = learning_rate(state.step, config.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if not (torch.isfinite(loss_sum) and (torch.isfinite(grad_norm) or scaler.is_enabled())):
            _on_nonfinite(config, state.step, loss_sum.item(), grad_norm.item(), run_dir)
            optimizer.zero_grad(set_to_none=True)  # skip: no update from this batch
        else:
            scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started

        tokens_per_s = config.batch.total_tokens / elapsed
        state.tokens_seen += config.batch.total_tokens
        last = {"kind": "train", "step": state.step, "tokens_seen": state.tokens_seen, "loss": loss_sum.item(),
                "lr": lr, "grad_norm": grad_norm.item(), "step_time_s": elapsed, "tokens_per_s": tokens_per_s,
                "time": time.time()}
        mfu = flops_per_token * tokens_per_s / (peak * ctx.world_size) if peak else None
        if mfu is not None:
            last["mfu"] = mfu
        logger.log(last, f"step {state.step:6d} | loss {last['loss']:.6f} | lr {lr:.4e} | norm {last['grad_norm']:.4f} | "
                         f"dt {elapsed * 1000:.1f}ms | tok/s {tokens_per_s:,.0f}" + (f" | mfu {mfu:.1%}" if mfu is not None else ""))
        state.step += 1

        if state.step % config.checkpoint.interval == 0 or state.step == config.last_step:
            _save(run_dir, config, model, optimizer, scaler, loader, state, tokenizer, device, ctx)
    eval_and_sample()  # the final model, after the last update
    logger.close()
    return last or {}


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


def _tokenizer(config: TrainConfig, ctx: Distributed) -> Tokenizer:
    """The run's tokenizer; trained first (by rank 0) when the config asks for one that does not exist yet."""
    data = config.data
    if data.tokenizer and data.train_tokenizer and not Path(data.tokenizer).is_file():
        if not data.files:
            raise MiniLlamaError("data.train_tokenizer is on but data.files is empty; name the text to train it on")
        if ctx.is_main:
            files = LocalFiles(list(data.files)).files
            train_tokenizer(files, config.model.vocab_size, Path(data.tokenizer))
        barrier(ctx)
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise MiniLlamaError(
            f"tokenizer {tokenizer.path} has vocab {tokenizer.vocab_size}, model.vocab_size is {config.model.vocab_size}; "
            "pass the matching --set data.tokenizer=PATH or --set model.vocab_size=N"
        )
    return tokenizer


def _data(config: TrainConfig, tokenizer: Tokenizer, ctx: Distributed) -> Path:
    """The prepared data directory, checked against model and tokenizer; prepared first when the config says so."""
    data = config.data
    data_dir = Path(data.dir)
    manifest = read_manifest(data_dir)
    if data.auto_prepare:
        source = FineWebEdu(data.subset) if data.source == "fineweb-edu" else LocalFiles(list(data.files), split_paragraphs=data.split_paragraphs)
        if manifest is not None and manifest["source"] != source.describe():
            raise MiniLlamaError(f"{data_dir} was prepared from {manifest['source']}, but the config names {source.describe()}; "
                                 "set another data.dir or delete this one")
        if manifest is None or not manifest.get("complete"):
            if ctx.is_main:
                prepare(source, data_dir, tokenizer, data.shard_tokens, data.val_tokens, workers=data.prepare_workers)
            barrier(ctx)
    elif manifest is None or not manifest.get("complete"):
        raise MiniLlamaError(f"{data_dir} holds no prepared data; make it with: {prepare_command(data)}  "
                             "(or --set data.auto_prepare=true)")
    check_data(data_dir, config.model.vocab_size, tokenizer.fingerprint)
    return data_dir


def _checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    saved = complete_checkpoints(run_dir)
    if resume == "never" and saved:
        raise MiniLlamaError(f"{run_dir} already holds checkpoints; use --resume to continue it, or choose another run_dir")
    if resume == "always" and not saved:
        raise MiniLlamaError(f"--resume: {run_dir} holds no complete checkpoint to resume from")
    return saved[-1] if saved and resume != "never" else None


def _save(run_dir: Path, config: TrainConfig, model: Transformer, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, loader: TrainLoader, state: RunState, tokenizer: Tokenizer,
          device: torch.device, ctx: Distributed) -> None:
    rng = gather_objects(rng_state(device), ctx)  # every rank takes part; rank 0 writes
    if ctx.is_main:
        save_training_checkpoint(
            run_dir, state.step, model, tokenizer,
            training_state={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                            "loader": loader.state_dict(), "rng": rng, "tokens_seen": state.tokens_seen,
                            "best_val_loss": state.best_val_loss},
            metadata={"run_dir": str(run_dir), "model_preset": config.model_preset, "tokens_seen": state.tokens_seen},
            keep_last=config.checkpoint.keep_last,
        )
    barrier(ctx)


def _restore(path: Path, model: Transformer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             loader: TrainLoader, state: RunState, device: torch.device, ctx: Distributed) -> None:
    load_weights(path, model)
    saved = load_training_state(path)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    loader.load_state_dict(saved["loader"])
    state.step, state.tokens_seen, state.best_val_loss = saved["step"], saved["tokens_seen"], saved["best_val_loss"]
    if len(saved["rng"]) == ctx.world_size:
        set_rng_state(saved["rng"][ctx.rank], device)
    if ctx.is_main:
        print(f"resumed from {path} at step {state.step}")
