"""Per-rank training memory: what DDP and FSDP really hold, beside the arithmetic the README's table comes from.

usage: python bench/memory.py [--preset mini-llama-109M] [--ranks 1 2 4] [--table] [--auto]
For each of ddp and fsdp at each number of ranks, torchrun starts that many CPU processes (gloo) that lay out the
preset as `minillama train` does (minillama.train.parallel), take one AdamW step on a micro-batch of 16 tokens,
and count the bytes of the tensors rank 0 then keeps: weights, gradients and optimizer state (each storage once,
FSDP's padding included). Beside them, `minillama.train.memory.model_state_bytes`. With --table, also prints the
README's table of per-rank memory by preset, GPU and layout (from minillama.train.memory; no processes). With
--auto, only what `batch.micro_batch = "auto"` picks for the reference run on GPUs of 24, 40, 80 and 141 GiB free,
beside the H200's measured peaks (docs/benchmarks.md) at 32 and 64 sequences per micro-batch.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from minillama.config import preset
from minillama.train.memory import MEMORY_SHARE, fitting_micro_batch, model_state_bytes, training_bytes_per_rank

MIB, GIB = 2**20, 2**30


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard)."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def worker(preset_name: str, parallel: str, out: Path) -> None:
    from minillama.model import Transformer
    from minillama.train.config import OptimConfig
    from minillama.distributed import close_distributed, init_distributed
    from minillama.train.optim import build_optimizer
    from minillama.train.parallel import clip_gradients, gradient_sync, parallelize

    ctx = init_distributed("cpu", alone_as_group=True)
    try:
        config, device = preset(preset_name), torch.device("cpu")
        torch.manual_seed(0)
        model = Transformer(config)
        _, step_model = parallelize(model, parallel, "none", False, None, device, ctx)
        optimizer = build_optimizer(model, OptimConfig(), device)
        tokens = torch.randint(0, config.vocab_size, (1, 16))
        with gradient_sync(step_model, sync=True):
            _, loss = step_model(tokens, tokens)
            loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        parameters = list(model.parameters())
        held = {"parameters": held_bytes(parameters), "gradients": held_bytes(p.grad for p in parameters),
                "optimizer": held_bytes(t for state in optimizer.state.values() for t in state.values()
                                        if isinstance(t, torch.Tensor) and t.dim() > 0)}
        if ctx.is_main:
            out.write_text(json.dumps(held))
    finally:
        close_distributed(ctx)


def measure(preset_name: str, parallel: str, ranks: int) -> dict[str, int]:
    out = Path(f".memory-{os.getpid()}-{parallel}-{ranks}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               "--worker", parallel, "--preset", preset_name, "--out", str(out)]
    try:
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        return json.loads(out.read_text())
    except subprocess.CalledProcessError as exc:
        sys.exit(f"{parallel} on {ranks} ranks failed:\n{exc.stderr[-4000:]}")
    finally:
        out.unlink(missing_ok=True)


def table() -> None:
    """Per-rank GiB by preset and layout, and the largest micro-batch that fits each GPU."""
    layouts = [("ddp", 1, "none"), ("fsdp", 2, "none"), ("fsdp", 8, "none"), ("fsdp", 8, "full")]
    print("| preset (seq_len) | parameters | " + " | ".join(f"{p} x{n}, AC {a}" for p, n, a in layouts) + " |")
    print("| --- | --- |" + " --- |" * len(layouts))
    rows = [("mini-llama-109M", 1024), ("mini-llama-341M", 2048), ("mini-llama-1.1B", 2048)]
    for name, seq_len in rows:
        config = preset(name)
        cells = []
        for parallel, ranks, checkpointing in layouts:
            fixed = training_bytes_per_rank(config, parallel, ranks, 0, seq_len, checkpointing)["total"]
            per_sequence = training_bytes_per_rank(config, parallel, ranks, 1, seq_len, checkpointing)["total"] - fixed
            fits = {gpu: int((gpu * GIB * 0.9 - fixed) // per_sequence) for gpu in (24, 80)}  # 10% for the allocator, CUDA
            cells.append(f"{fixed / GIB:.1f} + {per_sequence / GIB:.2f}/seq; fits {fits[24]} / {fits[80]}")
        parameters = sum(model_state_bytes(config, "ddp", 1).values()) // 16
        print(f"| {name} ({seq_len}) | {parameters / 1e6:,.0f}M | " + " | ".join(cells) + " |")


H200_PEAKS_GIB = {32: 17.7, 64: 33.8}  # mini-llama-109M compiled, bf16, micro-batch x 1024 tokens (docs/benchmarks.md)


def auto_table() -> None:
    """What micro_batch = "auto" picks for the reference run (ddp, one rank per GPU) by free GPU memory."""
    config = preset("mini-llama-109M")
    for micro_batch, peak in H200_PEAKS_GIB.items():
        estimate = training_bytes_per_rank(config, "ddp", 1, micro_batch, 1024, "none", 524_288 // 1024 // micro_batch)["total"]
        print(f"micro_batch {micro_batch}: estimate {estimate / GIB:.1f} GiB, H200 measured peak {peak} GiB")
    print("| GPU memory free | budget (90%) | auto picks | accumulation | estimate | H200-measured peak at that size |")
    print("| --- | --- | --- | --- | --- | --- |")
    for free in (24, 40, 80, 141):
        budget = int(free * GIB * MEMORY_SHARE["cuda"])
        choice = fitting_micro_batch(config, "ddp", 1, 524_288, 1024, "none", budget)
        peak = H200_PEAKS_GIB.get(choice.micro_batch)
        print(f"| {free} GiB | {budget / GIB:.1f} GiB | {choice.micro_batch} | {choice.accumulation} | "
              f"{choice.estimate_bytes / GIB:.1f} GiB | {f'{peak} GiB' if peak else 'not measured'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini-llama-109M")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--table", action="store_true", help="also print the README's table")
    parser.add_argument("--auto", action="store_true", help="only what micro_batch = auto picks by GPU memory")
    parser.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.preset, args.worker, args.out)
        return
    if args.auto:
        auto_table()
        return
    config = preset(args.preset)
    print(f"{args.preset}: per-rank MiB held by rank 0 (measured, CPU gloo) vs minillama.train.memory (formula)")
    print("| layout | ranks | weights | gradients | AdamW state | total | formula total | measured / formula |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for parallel in ("ddp", "fsdp"):
        for ranks in args.ranks:
            held = measure(args.preset, parallel, ranks)
            formula = model_state_bytes(config, parallel, ranks)
            total, expected = sum(held.values()), sum(formula.values())
            print(f"| {parallel} | {ranks} | {held['parameters'] / MIB:,.1f} | {held['gradients'] / MIB:,.1f} | "
                  f"{held['optimizer'] / MIB:,.1f} | {total / MIB:,.1f} | {expected / MIB:,.1f} | {total / expected:.4f} |")
    if args.table:
        print()
        table()


if __name__ == "__main__":
    main()
