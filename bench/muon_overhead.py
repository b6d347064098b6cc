"""What Muon's Newton-Schulz iterations cost: its optimizer step beside AdamW's on the same model, against a step.

usage: python bench/muon_overhead.py [--preset mini-llama-109M] [--device auto] [--micro-batch 1] [--repeats 3]
       [--tokens-per-step 524288]
Times optimizer.step() for AdamW over every parameter and for Muon (block matrices) + AdamW (the rest), with
random gradients, and one forward + backward of a micro-batch of max_seq_len tokens. A training step of the
reference recipe is tokens-per-step / (micro-batch x max_seq_len) such micro-steps plus one optimizer step; the
overhead is Muon's extra optimizer time as a fraction of that. Median of --repeats after one warm-up each.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from minillama.config import preset
from minillama.device import autocast, autocast_dtype, pick_device
from minillama.model import Transformer
from minillama.train.config import OptimConfig
from minillama.train.optim import build_optimizer


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up: lazy state, kernels
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini-llama-109M")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-per-step", type=int, default=524_288)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).to(device)
    precision = autocast_dtype(device, "auto")
    seq = model.config.max_seq_len
    tokens = torch.randint(0, model.config.vocab_size, (args.micro_batch, seq + 1), device=device)

    def forward_backward() -> None:
        with autocast(device, precision):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    micro = timed(forward_backward, device, args.repeats)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    steps = {}
    for name in ("adamw", "muon"):
        optimizer = build_optimizer(model, replace(OptimConfig(), name=name), device)
        steps[name] = timed(optimizer.step, device, args.repeats)
    micro_steps = args.tokens_per_step / (args.micro_batch * seq)
    training_step = micro * micro_steps + steps["adamw"]
    print(json.dumps({
        "bench": "muon overhead", "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "precision": str(precision), "forward_backward_s": round(micro, 4), "micro_batch": f"{args.micro_batch}x{seq}",
        "adamw_step_s": round(steps["adamw"], 4), "muon_step_s": round(steps["muon"], 4),
        "tokens_per_step": args.tokens_per_step, "training_step_s": round(training_step, 3),
        "muon_overhead_fraction": round((steps["muon"] - steps["adamw"]) / training_step, 5),
    }))


if __name__ == "__main__":
    main()
