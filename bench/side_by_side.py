"""Do only the work that is used: each goal of the inference/loading pass measured against its baseline, side by side.

usage: python bench/side_by_side.py [--rows hellaswag,load,inspect,prepare,prefill,decode] [--repeats 3]
Each row runs its two sides alternately (A B, B A, ...) `--repeats` times, each side in a fresh process where
memory or start-up is measured, and prints min and median of each side and of their ratio as JSON lines:
- hellaswag: examples per CPU-second, batched `score` vs a plain loop of one example (4 endings) per forward pass
  with the full output head; and peak RSS of each (mini-llama-109M, Llama 2 vocabulary, random weights).
- load: peak RSS of `load_for_inference` vs transformers' `from_pretrained` on the same weights (float32, CPU).
- inspect: wall time of `minillama inspect mini-llama-109M` vs `python -c "import torch"`.
- prepare: tokens per second with --workers 2 vs 1 on one 20 MB .txt file (one document).
- prefill: seconds for a 16-token prompt's last logits, head on the last position vs on all of them.
- decode: new tokens per second, batch 1, eager vs `compile=True` (compilation excluded: first call warms up).
Defaults read $MINILLAMA_TEST_DATA (the Llama 2 tokenizer, tiny shakespeare, the first 10 HellaSwag examples).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SHARED = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
TOKENIZER = SHARED / "llama2_tokenizer.model"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(argv: list[str]) -> dict:
    """Run one side of a row in a fresh interpreter; it prints one JSON object."""
    out = subprocess.run([sys.executable, __file__, "--child", *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the sides, each run in its own process -------------------------------------------------------------------


def hellaswag_examples(n: int):
    from minillama.eval.hellaswag import load_examples

    real = load_examples(SHARED / "hellaswag_val_head10.jsonl")

    def shorter(example, words_cut):  # repeats come in many lengths, as the real set's do
        words = example.context.split()
        return replace(example, context=" ".join(words[min(words_cut, len(words) - 3):]))

    return [shorter(real[i % len(real)], i // len(real) % 40) for i in range(n)]


def plain_loop(model, tokenizer, examples) -> list[list[float]]:
    """The baseline: one example per forward pass (its 4 endings right-padded), full-vocabulary logits everywhere."""
    import torch
    import torch.nn.functional as F

    losses = []
    with torch.no_grad():
        for example in examples:
            context = tokenizer.encode(example.context, bos=True)
            endings = [tokenizer.encode(e, bos=False) for e in example.endings]
            width = max(len(context) + len(e) for e in endings)
            tokens = torch.zeros(4, width, dtype=torch.long)
            for row, ending in enumerate(endings):
                tokens[row, : len(context) + len(ending)] = torch.tensor(context + ending)
            log_probs = F.log_softmax(model(tokens)[0].float(), dim=-1)
            losses.append([-sum(log_probs[row, len(context) - 1 + i, t].item() for i, t in enumerate(ending))
                           for row, ending in enumerate(endings)])
    return losses


def side_hellaswag(mode: str, n: int, batch_size: int) -> dict:
    import torch

    from minillama.config import preset
    from minillama.eval.hellaswag import score
    from minillama.model import Transformer
    from minillama.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(preset("mini-llama-109M")).eval()
    tokenizer = Tokenizer(TOKENIZER)
    examples = hellaswag_examples(n)
    start_cpu, start = time.process_time(), time.perf_counter()
    if mode == "batched":
        predictions, _ = score(model, tokenizer, examples, batch_size)
        losses = [list(p.losses) for p in predictions]
    else:
        losses = plain_loop(model, tokenizer, examples)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    return {"examples_per_cpu_s": n / cpu, "examples_per_s": n / wall, "peak_rss_mb": peak_rss_mb(), "losses": losses}


def side_load(mode: str, folder: str) -> dict:
    import torch

    before = peak_rss_mb()
    start = time.perf_counter()
    if mode == "minillama":
        from minillama.checkpoint import load_for_inference

        model, _, _ = load_for_inference(Path(folder) / "ckpt", device="cpu", dtype="float32")
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(Path(folder) / "hf", torch_dtype=torch.float32).eval()
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": before, "seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def side_prefill(mode: str, repeats: int) -> dict:
    import torch

    from minillama.config import preset
    from minillama.inference.cache import CachedPass, KVCache
    from minillama.model import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("mini-llama-109M")).eval()
    tokens = torch.randint(0, 32000, (1, 16))
    cache = KVCache(model.config, 1, 16, torch.device("cpu"), torch.float32)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            prefill = CachedPass.starting_at(cache, slice(0, 1), [0], 16)
            if mode == "last position":
                model.output(model.hidden_states(tokens, prefill)[:, -1])
            else:
                model(tokens, cache=prefill)[0][:, -1]
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[2:])}


def side_decode(mode: str, new_tokens: int) -> dict:
    import torch

    from minillama.config import preset
    from minillama.generate import generate_tokens
    from minillama.model import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("mini-llama-109M")).eval()
    prompt = [[1, *range(100, 115)]]
    compile_ = mode == "compiled"
    start = time.perf_counter()
    generate_tokens(model, prompt, 2, temperature=0, compile=compile_)  # warm-up (and compilation)
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate_tokens(model, prompt, new_tokens, temperature=0, compile=compile_)[0]
    seconds = time.perf_counter() - start
    return {"tokens_per_s": len(tokens) / seconds, "warm_up_s": warm_up, "tokens": tokens}


SIDES = {"hellaswag": side_hellaswag, "load": side_load, "prefill": side_prefill, "decode": side_decode}


# --- rows ---------------------------------------------------------------------------------------------------------


def alternate(measure_a, measure_b, repeats: int) -> tuple[list, list]:
    """Measure A and B `repeats` times each, in the order A B, B A, A B, ... so that drift hits both sides alike."""
    a, b = [], []
    for i in range(repeats):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            (a if side == 0 else b).append(measure_a() if side == 0 else measure_b())
    return a, b


def rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return {k: rounded(v) for k, v in value.items()} if isinstance(value, dict) else value


def report(row: str, metric: str, names: tuple[str, str], a: list[float], b: list[float], goal: str, **extra) -> None:
    ratios = [x / y for x, y in zip(a, b)]
    print(json.dumps(rounded({
        "row": row, "metric": metric, names[0]: {"min": min(a), "median": statistics.median(a)},
        names[1]: {"min": min(b), "median": statistics.median(b)},
        "ratio": {"min": min(ratios), "median": statistics.median(ratios)}, "goal": goal, **extra,
    })), flush=True)


def row_hellaswag(repeats: int) -> None:
    n, batch_size = 48, 16
    runs = alternate(lambda: child(["hellaswag", "batched", str(n), str(batch_size)]),
                     lambda: child(["hellaswag", "plain", str(n), str(batch_size)]), repeats)
    batched, plain = runs
    worst = max(abs(x - y) for b, p in zip(batched[0]["losses"], plain[0]["losses"]) for x, y in zip(b, p))
    report("hellaswag", "examples per CPU-second", ("batched", "plain loop"),
           [r["examples_per_cpu_s"] for r in batched], [r["examples_per_cpu_s"] for r in plain], "ratio >= 1.5")
    report("hellaswag", "peak RSS MB", ("batched", "plain loop"),
           [r["peak_rss_mb"] for r in batched], [r["peak_rss_mb"] for r in plain], "as low as it goes (1.37 before)",
           largest_summed_loss_difference=worst)


def row_load(repeats: int) -> None:
    import torch

    from minillama.checkpoint import save_checkpoint
    from minillama.config import preset
    from minillama.interop.hf import export_hf
    from minillama.model import Transformer
    from minillama.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_checkpoint(Path(folder) / "ckpt", Transformer(preset("mini-llama-109M")), Tokenizer(TOKENIZER))
        export_hf(Path(folder) / "ckpt", Path(folder) / "hf", "float32")
        ours, theirs = alternate(lambda: child(["load", "minillama", folder]), lambda: child(["load", "transformers", folder]), repeats)
    report("load", "peak RSS MB", ("minillama", "transformers"), [r["peak_rss_mb"] for r in ours],
           [r["peak_rss_mb"] for r in theirs], "ratio <= 1.05",
           seconds={"minillama": statistics.median(r["seconds"] for r in ours),
                    "transformers": statistics.median(r["seconds"] for r in theirs)})


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def row_inspect(repeats: int) -> None:
    inspect = [sys.executable, "-m", "minillama", "inspect", "mini-llama-109M"]
    a, b = alternate(lambda: timed(inspect), lambda: timed([sys.executable, "-c", "import torch"]), max(repeats, 5))
    report("inspect", "seconds", ("inspect mini-llama-109M", "import torch"), a, b, "ratio <= 1.3")


def row_prepare(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        book = Path(folder) / "book.txt"
        book.write_text((SHARED / "tinyshakespeare.txt").read_text() * 18)  # about 20 MB, one document

        def run(workers: int) -> float:
            out = Path(folder) / f"out{workers}"
            seconds = timed([sys.executable, "-m", "minillama", "prepare", "text", str(book), "--out", str(out),
                             "--tokenizer", str(TOKENIZER), "--workers", str(workers), "--shard-tokens", "2000000",
                             "--val-tokens", "100000", "--overwrite"])
            return json.loads((out / "manifest.json").read_text())["tokens"] / seconds

        two, one = alternate(lambda: run(2), lambda: run(1), repeats)
        same = all((Path(folder) / "out1" / p.name).read_bytes() == p.read_bytes() for p in (Path(folder) / "out2").glob("*.bin"))
        megabytes = book.stat().st_size / 1e6
    report("prepare", "tokens per second", ("2 workers", "1 worker"), two, one, "ratio >= 1.6", megabytes=megabytes,
           identical_shards=same)


def row_prefill(repeats: int) -> None:
    last, full = alternate(lambda: child(["prefill", "last position", "20"]), lambda: child(["prefill", "all positions", "20"]), repeats)
    report("prefill", "seconds per 16-token prompt", ("head on last position", "head on all positions"),
           [r["seconds"] for r in last], [r["seconds"] for r in full], "ratio < 1")


def row_decode(repeats: int) -> None:
    compiled, eager = alternate(lambda: child(["decode", "compiled", "48"]), lambda: child(["decode", "eager", "48"]), repeats)
    report("decode", "new tokens per second, batch 1", ("compile=True", "eager"), [r["tokens_per_s"] for r in compiled],
           [r["tokens_per_s"] for r in eager], "works; same tokens", same_tokens=compiled[0]["tokens"] == eager[0]["tokens"],
           compile_warm_up_s=statistics.median(r["warm_up_s"] for r in compiled))


ROWS = {"hellaswag": row_hellaswag, "load": row_load, "inspect": row_inspect, "prepare": row_prepare,
        "prefill": row_prefill, "decode": row_decode}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        args = [int(a) if a.isdigit() else a for a in rest]
        print(json.dumps(SIDES[kind](*args)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for row in args.rows.split(","):
        ROWS[row](args.repeats)


if __name__ == "__main__":
    main()
