"""Load on `minillama serve`: 32 concurrent clients vs the same requests one at a time, on localhost.

usage: python bench/serve_load.py [--presets tiny mini-llama-109M] [--requests 128] [--clients 32] [--max-batch 32]
For each preset: random weights saved as a checkpoint (tiny with llama2.c's tok512 vocabulary, the others with
Llama 2's, from $MINILLAMA_TEST_DATA), a server started on a free port, then the same 128 greedy requests (varied
prompts; 64 new tokens for tiny, 16 for the larger presets) sent by 32 concurrent clients and then one at a time.
Prints p50/p99 latency, completion tokens per second and failures for both, and the ratio of throughputs.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from minillama.checkpoint import save_checkpoint
from minillama.config import preset
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer

WORDS = "the king said that his horse would ride north before the winter came over the hills and rivers".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def load(url: str, prompts: list[str], max_tokens: int, clients: int) -> dict:
    """Send every prompt, `clients` at a time; latency of each, and completion tokens per wall second."""
    work = list(enumerate(prompts))
    lock = threading.Lock()
    latencies, tokens, failures = [], [0], [0]

    def client() -> None:
        while True:
            with lock:
                if not work:
                    return
                _, prompt = work.pop()
            try:
                seconds, n = complete(url, prompt, max_tokens)
            except OSError:
                with lock:
                    failures[0] += 1
                continue
            with lock:
                latencies.append(seconds)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "requests": len(prompts), "failures": failures[0], "seconds": round(wall, 2),
            "completion_tokens_per_s": round(tokens[0] / wall, 1), "p50_latency_s": round(statistics.median(latencies), 3),
            "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}


def main() -> None:
    shared = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "mini-llama-109M"])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    for name in args.presets:
        with tempfile.TemporaryDirectory() as folder:
            config = preset(name)
            tokenizer = Tokenizer(shared / ("tok512.model" if config.vocab_size == 512 else "llama2_tokenizer.model"))
            torch.manual_seed(0)
            save_checkpoint(Path(folder) / "ckpt", Transformer(config), tokenizer)
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "minillama", "serve", str(Path(folder) / "ckpt"), "--port", str(port),
                                       "--device", "cpu", "--max-batch", str(args.max_batch)], stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(600):
                    try:
                        urllib.request.urlopen(f"{url}/health", timeout=1)
                        break
                    except OSError:
                        time.sleep(0.2)
                max_tokens = 64 if name == "tiny" else 16
                prompts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(args.requests)]
                concurrent = load(url, prompts, max_tokens, args.clients)
                sequential = load(url, prompts, max_tokens, 1)
                print(json.dumps({"bench": "serve load", "preset": name, "max_batch": args.max_batch, "new_tokens": max_tokens,
                                  "concurrent": concurrent, "one_at_a_time": sequential,
                                  "throughput_ratio": round(concurrent["completion_tokens_per_s"] / sequential["completion_tokens_per_s"], 2),
                                  "goal": "ratio >= 2, no failures"}), flush=True)
            finally:
                server.terminate()
                server.wait(timeout=120)


if __name__ == "__main__":
    main()
