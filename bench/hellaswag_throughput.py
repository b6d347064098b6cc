"""HellaSwag scoring speed: examples/s batched vs one example per forward pass, on the present device.

usage: python bench/hellaswag_throughput.py [--data FILE] [--examples N] [--batch-size 64] [--preset mini-llama-109M]
       [--tokenizer PATH] [--device auto] [--skip-single]
Random weights (speed does not depend on them). Without the full validation file, the real examples in --data
are repeated to --examples, each repeat with a few more words cut from the front of its context, so that batches
come in many widths as in the real set (a GPU pays once per new shape).
Defaults read $MINILLAMA_TEST_DATA (the first 10 validation examples and the Llama 2 tokenizer).
"""

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from minillama.config import preset
from minillama.eval.hellaswag import Example, load_examples, score
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer
from minillama.device import pick_device


def with_shorter_context(example: Example, words_cut: int) -> Example:
    words = example.context.split()
    return replace(example, context=" ".join(words[min(words_cut, len(words) - 3):]))


def main() -> None:
    shared = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=shared / "hellaswag_val_head10.jsonl")
    parser.add_argument("--tokenizer", default=shared / "llama2_tokenizer.model")
    parser.add_argument("--examples", type=int, default=10_042)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preset", default="mini-llama-109M")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-single", action="store_true")
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Transformer(preset(args.preset)).to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer(args.tokenizer)
    real = load_examples(Path(args.data))
    examples = [with_shorter_context(real[i % len(real)], i // len(real) % 40) for i in range(args.examples)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = [("batched", args.batch_size)] + ([] if args.skip_single else [("one at a time", 1)])
    for name, batch_size in runs:
        score(model, tokenizer, examples[: 2 * batch_size], batch_size)  # warm up kernels and allocator
        sync()
        start = time.perf_counter()
        predictions, _ = score(model, tokenizer, examples, batch_size)
        sync()
        seconds = time.perf_counter() - start
        print(json.dumps({"bench": "hellaswag", "mode": name, "batch_size": batch_size, "examples": len(predictions),
                          "seconds": round(seconds, 2), "examples_per_s": round(len(predictions) / seconds, 1),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                          "preset": args.preset, "dtype": str(dtype)}))


if __name__ == "__main__":
    main()
