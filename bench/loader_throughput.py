"""Batches/s and tokens/s of the training loader reading 64 x 1024 batches from memory-mapped shards, one core.

usage: python bench/loader_throughput.py [--batch 64] [--seq 1024] [--batches 300] [--shard-tokens 20000000]
Writes two random uint16 shards (the page cache holds them, as it would on a training box) and times the
shuffled loader, which is the slower path (random windows).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minillama.data.loader import TrainLoader
from minillama.data.shards import write_manifest, write_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--shard-tokens", type=int, default=20_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        shards = []
        for i, split in enumerate(["val", "train", "train"]):
            name = f"{split}_{i:06d}.bin"
            sha = write_shard(Path(tmp) / name, rng.integers(0, 32000, args.shard_tokens, dtype=np.uint16))
            shards.append({"file": name, "split": split, "tokens": args.shard_tokens, "documents": 0, "sha256": sha})
        write_manifest(Path(tmp), {"format": "minillama-shards", "format_version": 1, "dtype": "uint16", "complete": True,
                                   "tokenizer": {"fingerprint": "", "vocab_size": 32000}, "shards": shards})
        for shuffle in (True, False):
            loader = TrainLoader(Path(tmp), args.batch, args.seq, shuffle=shuffle)
            next(loader)
            start = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            elapsed = time.perf_counter() - start
            print(json.dumps({"shuffle": shuffle, "batch": args.batch, "seq": args.seq,
                              "batches_per_s": round(args.batches / elapsed, 1),
                              "tokens_per_s": round(args.batches * args.batch * args.seq / elapsed)}))


if __name__ == "__main__":
    main()
