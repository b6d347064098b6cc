"""Does a recipe reach the AdamW recipe's loss with fewer tokens? Small models, three real corpora, 3 seeds, and an
ablation of the speedrun recipe's options.

usage: python bench/recipe_efficiency.py [--steps 150] [--seeds 0 1 2] [--corpora shakespeare python docs]
Each corpus is split by position into train (80%), tune (10%) and validation (10%) text, and gets its own
1024-token BPE vocabulary, trained on the train part. The baseline is the reference recipe scaled down (AdamW,
betas 0.9/0.95, weight decay 0.1, warmup + cosine to 10%, clip 1.0) with its learning rate picked from a sweep by the
loss on the tune split (seed 0); Muon's learning rate is swept the same way (with AdamW's parts at the tuned rate).
The validation split is only ever reported. Recipes: the baseline; Muon + WSD; the speedrun recipe (Muon + WSD with
momentum warmup 0.85 -> 0.95, zero-initialised output projections and a higher embedding rate); and the speedrun
recipe with each of its options off in turn. Every run sees the same batches for the same seed. Prints one JSON
line per run, then a summary per corpus: final validation loss (mean and spread over seeds) at equal tokens, and the
tokens each recipe needs to reach the baseline's mean final validation loss.
Corpora: tiny shakespeare ($MINILLAMA_TEST_DATA), the Python standard library's own .py files, and the prose of
Python's documentation topics as shipped with the interpreter (pydoc_data); the last two are on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minillama.config import ModelConfig
from minillama.model import Transformer
from minillama.tokenizer import train_tokenizer
from minillama.train.config import OptimConfig
from minillama.train.optim import build_optimizer, set_learning_rates, zero_output_projections

MODEL = ModelConfig(dim=192, n_layers=4, n_heads=3, n_kv_heads=3, vocab_size=1024, multiple_of=64, max_seq_len=128)
BATCH, SEQ = 16, 128
EVALS = 10  # validation-loss points per run, for the tokens-to-target curve
BASELINE = OptimConfig(name="adamw", schedule="cosine", weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
SWEEP = (1e-3, 3e-3, 6e-3)
MUON_SWEEP = (0.01, 0.02, 0.04)
# The speedrun recipe's options, each as (what it changes in the optimizer config, whether it zero-initialises).
OPTIONS = {
    "momentum warmup": ({"muon_momentum_warmup_steps": None}, False),  # None: a fifth of the steps, filled in below
    "zero-init projections": ({}, True),
    "embedding lr x2": ({"embedding_lr_multiplier": 2.0}, False),
}


def corpus_text(name: str) -> str:
    if name == "shakespeare":
        return (Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data")) / "tinyshakespeare.txt").read_text()
    if name == "docs":
        from pydoc_data.topics import topics  # the language reference's prose, as `help()` shows it

        return "\n\n".join(topics[key] for key in sorted(topics))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))  # the top-level modules: about 6 MB of real, varied code
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)[:1_500_000]


def splits(name: str, folder: Path) -> dict[str, np.ndarray]:
    text = corpus_text(name)
    cut_tune, cut_val = int(len(text) * 0.8), int(len(text) * 0.9)
    (folder / f"{name}.train.txt").write_text(text[:cut_tune])
    tokenizer = train_tokenizer([folder / f"{name}.train.txt"], MODEL.vocab_size, folder / f"{name}.model")
    encode = lambda part: np.array(tokenizer.sp.encode(part), dtype=np.int64)  # noqa: E731
    return {"train": encode(text[:cut_tune]), "tune": encode(text[cut_tune:cut_val]), "val": encode(text[cut_val:])}


def loss_on(model: Transformer, tokens: np.ndarray, windows: int = 32) -> float:
    """Mean loss over the first `windows` windows of SEQ tokens (a fixed set)."""
    starts = np.arange(windows) * SEQ
    batch = torch.from_numpy(np.stack([tokens[s : s + SEQ + 1] for s in starts]))
    with torch.no_grad():
        return model.eval()(batch[:, :-1], batch[:, 1:])[1].item()


def run(data: dict[str, np.ndarray], optim: OptimConfig, seed: int, steps: int, held_out: str, zero_init: bool = False) -> dict:
    torch.manual_seed(seed)
    model = Transformer(MODEL)
    if zero_init:
        zero_output_projections(model)
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    batches = np.random.default_rng(seed)
    curve, started = [], time.perf_counter()
    for step in range(steps):
        model.train()
        starts = batches.integers(0, len(data["train"]) - SEQ - 1, BATCH)
        batch = torch.from_numpy(np.stack([data["train"][s : s + SEQ + 1] for s in starts]))
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        set_learning_rates(optimizer, step, optim)
        optimizer.step()
        if (step + 1) % max(1, steps // EVALS) == 0 or step == steps - 1:
            curve.append(((step + 1) * BATCH * SEQ, loss_on(model, data[held_out])))
    return {"final": curve[-1][1], "curve": curve, "seconds": time.perf_counter() - started}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which a loss curve first reaches `target`, linearly interpolated between evaluations."""
    for (t0, l0), (t1, l1) in zip([(0, float("inf"))] + curve, curve):
        if l1 <= target:
            return t1 if l0 == float("inf") else t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def swept(data: dict[str, np.ndarray], make: Callable[[float], OptimConfig], grid: tuple[float, ...], seed: int, steps: int, label: str,
          corpus: str) -> float:
    """The rate with the lowest tune loss; a best value at an edge of the grid extends it past that edge, so the
    optimum is bracketed."""
    losses: dict[float, float] = {}
    todo = list(grid)
    while todo:
        for value in todo:
            losses[value] = run(data, make(value), seed, steps, "tune")["final"]
            print(json.dumps({"corpus": corpus, f"sweep_{label}": value, "tune_loss": round(losses[value], 4)}), flush=True)
        best, tried = min(losses, key=losses.get), sorted(losses)
        todo = [best / 2] if best == tried[0] else [best * 2] if best == tried[-1] else []
    return min(losses, key=losses.get)


def recipes(lr: float, muon_lr: float, steps: int) -> dict[str, tuple[OptimConfig, bool]]:
    schedule = dict(max_steps=steps, warmup_steps=max(1, steps // 15))
    adamw = replace(BASELINE, lr=lr, min_lr=lr / 10, **schedule)
    muon = replace(adamw, name="muon", schedule="wsd", muon_lr=muon_lr)

    def speedrun(without: str | None = None) -> tuple[OptimConfig, bool]:
        fields, zero_init = {}, False
        for option, (changes, zeroes) in OPTIONS.items():
            if option != without:
                fields.update({k: (v if v is not None else max(1, steps // 5)) for k, v in changes.items()})
                zero_init |= zeroes
        return replace(muon, **fields), zero_init

    return {"adamw+cosine": (adamw, False), "muon+wsd": (muon, False), "speedrun": speedrun(),
            **{f"speedrun without {option}": speedrun(option) for option in OPTIONS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpora", nargs="+", default=["shakespeare", "python", "docs"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    schedule = dict(max_steps=args.steps, warmup_steps=max(1, args.steps // 15))
    total = args.steps * BATCH * SEQ
    with tempfile.TemporaryDirectory() as folder:
        for corpus in args.corpora:
            data = splits(corpus, Path(folder))
            lr = swept(data, lambda v: replace(BASELINE, lr=v, min_lr=v / 10, **schedule), SWEEP, args.seeds[0], args.steps, "lr", corpus)
            muon_lr = swept(data, lambda v: replace(BASELINE, name="muon", schedule="wsd", lr=lr, min_lr=lr / 10, muon_lr=v, **schedule),
                            MUON_SWEEP, args.seeds[0], args.steps, "muon_lr", corpus)
            results: dict[str, list[dict]] = {}
            for name, (optim, zero_init) in recipes(lr, muon_lr, args.steps).items():
                for seed in args.seeds:
                    result = run(data, optim, seed, args.steps, "val", zero_init)
                    results.setdefault(name, []).append(result)
                    print(json.dumps({"corpus": corpus, "recipe": name, "seed": seed, "final_val_loss": round(result["final"], 4),
                                      "seconds": round(result["seconds"], 1)}), flush=True)
            target = statistics.mean(r["final"] for r in results["adamw+cosine"])
            summary = {}
            for name, runs in results.items():
                mean_curve = [(t, statistics.mean(r["curve"][i][1] for r in runs)) for i, (t, _) in enumerate(runs[0]["curve"])]
                needed = tokens_to_reach(mean_curve, target)
                finals = [r["final"] for r in runs]
                summary[name] = {"final_val_loss": round(statistics.mean(finals), 4), "spread": round(max(finals) - min(finals), 4),
                                 "tokens_to_adamw_final": needed and round(needed), "ratio": needed and round(needed / total, 3)}
            print(json.dumps({"corpus": corpus, "tokens_per_run": total, "tuned_adamw_lr": lr, "tuned_muon_lr": muon_lr,
                              "model": f"dim {MODEL.dim}, {MODEL.n_layers} layers", "recipes": summary, "goal": "speedrun ratio <= 0.25"}),
                  flush=True)


if __name__ == "__main__":
    main()
