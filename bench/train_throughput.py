"""Training throughput of one device: tokens/s, MFU and peak memory for full optimizer steps on random tokens.

usage: python bench/train_throughput.py [--preset mini-llama-109M] [--batch 32] [--seq 1024] [--steps 20]
       [--warmup 5] [--no-compile] [--device auto] [--dtype auto] [--profile]
       [--no-cudnn-attention] [--parallel ddp|fsdp] [--activation-checkpointing none|full|selective]
A step is forward + backward (bf16 autocast where supported) + gradient clipping + fused AdamW, as in training,
with the model laid out as `minillama train` lays it out (fsdp: one rank of its own). Prints one JSON line, with
the peak memory beside minillama.train.memory's estimate; --profile then profiles 3 more steps and prints the top
kernels by device time.
"""

import argparse
import json
import time

import torch

from minillama.config import preset
from minillama.model import Transformer
from minillama.summary import training_flops_per_token
from minillama.train.config import OptimConfig
from minillama.device import autocast, autocast_dtype, peak_flops, pick_device
from minillama.distributed import close_distributed, init_distributed
from minillama.train.memory import training_bytes_per_rank
from minillama.train.optim import build_optimizer
from minillama.train.parallel import clip_gradients, parallelize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini-llama-109M")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the top kernels")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="let SDPA pick among flash, efficient and math")
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    args = parser.parse_args()

    device = pick_device(args.device)
    precision = autocast_dtype(device, args.dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.enable_cudnn_sdp(not args.no_cudnn_attention)
    config = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    ctx = init_distributed(args.device, alone_as_group=args.parallel == "fsdp")
    _, step_model = parallelize(model, args.parallel, args.activation_checkpointing, not args.no_compile, precision, device, ctx)
    optimizer = build_optimizer(model, OptimConfig(), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            _, loss = step_model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_gradients(model, 1.0)
        scaler.step(optimizer)
        scaler.update()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * args.batch * args.seq / elapsed
    peak = peak_flops(device)
    print(json.dumps({
        "bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "compiled": not args.no_compile,
        "parallel": args.parallel, "activation_checkpointing": args.activation_checkpointing,
        "attention": "no cudnn" if args.no_cudnn_attention else "default",
        "dtype": str(precision or torch.float32), "steps": args.steps, "warmup_s": round(warmup_s, 1),
        "step_ms": round(1000 * elapsed / args.steps, 1), "tokens_per_s": round(tokens_per_s),
        "mfu": round(training_flops_per_token(config, args.seq) * tokens_per_s / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "estimated_memory_gib": round(training_bytes_per_rank(config, args.parallel, 1, args.batch, args.seq,
                                                              args.activation_checkpointing, accumulation=1)["total"] / 2**30, 2),
        "torch": torch.__version__,
    }))
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(3):
                step()
            sync()
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60))
    close_distributed(ctx)


if __name__ == "__main__":
    main()
