"""Tokens/s of `minillama prepare text` with 1 and 2 worker processes, against SentencePiece alone on one core.

usage: python bench/prepare_throughput.py [--corpus FILE] [--tokenizer PATH] [--megabytes 20] [--workers 1 2]
The corpus is repeated until it reaches --megabytes and written as a .jsonl of ~4 KB documents (FineWeb-Edu's
median document is a few KB). Defaults: tiny shakespeare and the Llama 2 tokenizer from $MINILLAMA_TEST_DATA.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from minillama.data.prepare import prepare
from minillama.data.sources import LocalFiles
from minillama.tokenizer import Tokenizer


def main() -> None:
    shared = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=shared / "tinyshakespeare.txt")
    parser.add_argument("--tokenizer", default=shared / "llama2_tokenizer.model")
    parser.add_argument("--megabytes", type=float, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    tokenizer = Tokenizer(args.tokenizer)
    text = Path(args.corpus).read_text()
    docs = [text[i : i + 4000] for i in range(0, len(text), 4000)]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w") as f:
            written = 0
            while written < args.megabytes * 1e6:
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")
                    written += len(doc.encode())
        print(json.dumps({"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "cpus": os.cpu_count()}))

        sample = docs * 5
        start = time.perf_counter()
        n = sum(len(ids) for ids in tokenizer.sp.encode(sample, num_threads=1))
        baseline = n / (time.perf_counter() - start)
        print(json.dumps({"what": "sentencepiece encode alone, 1 thread", "tokens_per_s": round(baseline)}))

        results = {}
        for workers in args.workers:
            start = time.perf_counter()
            manifest = prepare(LocalFiles([str(corpus)]), Path(tmp) / f"out{workers}", tokenizer,
                               shard_tokens=10_000_000, val_tokens=1_000_000, workers=workers, progress=False)
            elapsed = time.perf_counter() - start
            results[workers] = manifest["tokens"] / elapsed
            print(json.dumps({"what": "minillama prepare text", "workers": workers, "tokens": manifest["tokens"],
                              "seconds": round(elapsed, 2), "tokens_per_s": round(results[workers]),
                              "tokens_per_s_per_worker": round(results[workers] / workers)}))
        if 1 in results and len(results) > 1:
            for workers, rate in results.items():
                if workers > 1:
                    print(json.dumps({"scaling_efficiency": {workers: round(rate / (workers * results[1]), 3)}}))


if __name__ == "__main__":
    main()
