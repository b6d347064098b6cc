"""Load on `minillama serve`, side by side with other servers on the same weights, on localhost.

usage: python bench/serve_load.py [--presets tiny] [--clients 1 8 32] [--requests 64] [--max-batch 32] [--device cpu]
                                  [--baseline-src OTHER_CHECKOUT/src] [--llama-cpp] [--threads 2]
For each preset: random weights saved as a checkpoint (tiny with llama2.c's tok512 vocabulary, the others with
Llama 2's, from $MINILLAMA_TEST_DATA), then each server started on a free port in turn:
- minillama: this checkout's `minillama serve`;
- baseline (--baseline-src): `minillama serve` from another checkout's src folder (e.g. the commit before a change);
- llama.cpp (--llama-cpp): llama-cpp-python's OpenAI server on `minillama export gguf --dtype f32` of the same
  checkpoint (needs its server extras: sse-starlette, starlette-context, pydantic-settings).
Each gets the same requests at 1, 8 and 32 concurrent clients: greedy, varied prompts, max_tokens drawn from
8..256 with a fixed seed, no stop; it prints completion tokens per second and p50/p99 latency per client count.
Then head-of-line blocking: one 400-token request (or as long as the context allows) alone, and again with 8
short requests (8 tokens) sent 0.3 s after it: the median short latency as a share of the long request's time alone.
"""

import argparse
import json
import os
import random
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


def complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1200) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def load(url: str, model: str, work: list[tuple[str, int]], clients: int) -> dict:
    """Send every (prompt, max_tokens), `clients` at a time; latencies, and completion tokens per wall second."""
    queue, lock = list(reversed(work)), threading.Lock()
    latencies, tokens, failures = [], [0], [0]

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                prompt, max_tokens = queue.pop()
            try:
                seconds, n = complete(url, model, prompt, max_tokens)
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
    return {"clients": clients, "requests": len(work), "failures": failures[0], "seconds": round(wall, 2),
            "completion_tokens_per_s": round(tokens[0] / wall, 1), "p50_latency_s": round(statistics.median(latencies), 3),
            "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}


def head_of_line(url: str, model: str, long_tokens: int) -> dict:
    """One long request alone, then with 8 short requests (8 tokens) sent 0.3 s after it."""
    alone, _ = complete(url, model, "the king", long_tokens)
    shorts: list[float] = []
    long = threading.Thread(target=complete, args=(url, model, "the king", long_tokens))
    long.start()
    time.sleep(0.3)
    threads = [threading.Thread(target=lambda i=i: shorts.append(complete(url, model, f"the horse {i}", 8)[0])) for i in range(8)]
    for t in threads:
        t.start()
    for t in [*threads, long]:
        t.join()
    return {"long_tokens": long_tokens, "long_alone_s": round(alone, 3), "short_median_s": round(statistics.median(shorts), 3),
            "short_over_long": round(statistics.median(shorts) / alone, 3), "goal": "< 0.35"}


def wait_up(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode})")
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def servers(args: argparse.Namespace, checkpoint: Path, folder: Path) -> dict[str, tuple[list[str], dict]]:
    """name -> (command with {port}, extra environment)."""
    ours = ["serve", str(checkpoint), "--port", "{port}", "--device", args.device, "--max-batch", str(args.max_batch),
            "--model-name", "bench", "--max-queue", str(max(256, 4 * args.max_batch))]
    found = {"minillama": ([sys.executable, "-m", "minillama", *ours], {})}
    if args.baseline_src:
        old = [a for a in ours if a not in ("--max-queue", str(max(256, 4 * args.max_batch)))]
        found["baseline"] = ([sys.executable, "-m", "minillama", *old], {"PYTHONPATH": str(Path(args.baseline_src).resolve())})
    if args.llama_cpp:
        gguf = folder / "model.gguf"
        subprocess.run([sys.executable, "-m", "minillama", "export", "gguf", str(checkpoint), str(gguf), "--dtype", "f32"],
                       check=True, stdout=subprocess.DEVNULL)
        found["llama.cpp"] = ([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench",
                               "--port", "{port}", "--n_ctx", str(checkpoint_context(checkpoint)), "--n_threads", str(args.threads),
                               "--n_batch", "512"], {})
    return found


def checkpoint_context(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["model"]["max_seq_len"]


def main() -> None:
    shared = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--baseline-src", help="another checkout's src folder, served the same way, for a before/after")
    parser.add_argument("--llama-cpp", action="store_true", help="also llama-cpp-python's server on the GGUF export")
    parser.add_argument("--device", default="cpu", help="where the minillama servers run (default cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.presets:
        with tempfile.TemporaryDirectory() as folder:
            config = preset(name)
            tokenizer = Tokenizer(shared / ("tok512.model" if config.vocab_size == 512 else "llama2_tokenizer.model"))
            torch.manual_seed(0)
            checkpoint = Path(folder) / "ckpt"
            save_checkpoint(checkpoint, Transformer(config), tokenizer)
            rng = random.Random(0)
            limit = min(256, config.max_seq_len - 32)
            work = [(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9)), rng.randint(8, limit))
                    for i in range(args.requests)]
            for server, (command, env) in servers(args, checkpoint, Path(folder)).items():
                port = free_port()
                process = subprocess.Popen([c.replace("{port}", str(port)) for c in command], env={**os.environ, **env},
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                url = f"http://127.0.0.1:{port}"
                try:
                    wait_up(url, process)
                    complete(url, "bench", "warm up", 8)
                    for clients in args.clients:
                        print(json.dumps({"bench": "serve load", "server": server, "preset": name, "max_batch": args.max_batch,
                                          "max_tokens": "8..256", **load(url, "bench", work, clients)}), flush=True)
                    print(json.dumps({"bench": "head of line", "server": server, "preset": name, **head_of_line(url, "bench", min(400, config.max_seq_len - 16))}),
                          flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=120)


if __name__ == "__main__":
    main()
