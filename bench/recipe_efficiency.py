"""Does a recipe reach the AdamW recipe's loss with fewer tokens? Small models, three real corpora, 3 seeds, and an
ablation of the speedrun recipe's options.

usage: python bench/recipe_efficiency.py [--steps 100] [--seeds 0 1 2] [--corpora shakespeare python docs] [--options ...]
                                         [--candidates ...] [--lr X --muon-lr Y] [--stages 25%/50%]
                                         [--embedding-lr 4 --speedrun-muon-lr Z | --tune-speedrun]
                                         [--no-ablation] [--budgets 0.2 0.25 ...] [--equal-tokens] [--threads N]
Each corpus is split by position into train (80%), tune (10%) and validation (10%) text, and gets its own 1024-token
BPE vocabulary, trained on the train part; a split's loss is measured on 64 windows spread evenly over all of it. The
baseline is the reference recipe scaled down (AdamW, betas 0.9/0.95, weight decay 0.1, warmup + cosine to 10%, clip
1.0) with its learning rate picked from a sweep by the loss on the tune split (seed 0); Muon's learning rate is swept
the same way (with AdamW's parts at the tuned rate). The validation split is only ever reported. Recipes: the
baseline; Muon + WSD; the speedrun recipe (Muon + WSD with every option of `speedrun_options` or those named by
--options: Muon's momentum warmup and cooldown, Polar Express, weight decay and its cautious form, a higher embedding
rate (x4, or --embedding-lr), zero-initialised output projections, batch-size stages), whose own Muon rate (a
quarter, half or all of Muon + WSD's) and embedding multiplier --tune-speedrun picks on the tune split by the goal's
measure (all seeds); the speedrun recipe with each option off in turn (unless --no-ablation); and with each of the
--candidates added. Every run of a seed draws its batches from the same generator. Prints one JSON line per run, then
a summary per corpus: final validation loss (mean and spread over seeds) after the same steps (fewer tokens where
batch stages shrink the first steps), and the tokens each recipe needs to reach the baseline's mean final validation
loss, as a fraction of the baseline's tokens. That fraction is read off a run planned for all the steps (mid-run, WSD
is still at its peak rate, its loss above what a run that decays there reaches); a speedrun plans its own, shorter
run (the speedrun config sets max_steps), so Muon + WSD and the speedrun recipe are also trained for each of
--budgets (fractions of --steps) with every schedule length scaled to that run, and the fewest tokens of a run whose
mean final validation loss reaches the baseline's is reported too (`own_schedule_ratio`). --equal-tokens trains the
speedrun recipe for the steps that make the baseline's tokens, its final loss at equal tokens.
Corpora: tiny shakespeare ($MINILLAMA_TEST_DATA), the Python standard library's own .py files, and the prose of
Python's documentation topics as shipped with the interpreter (pydoc_data); the last two are on every machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from minillama.config import ModelConfig
from minillama.model import Transformer
from minillama.tokenizer import train_tokenizer
from minillama.train.config import BatchConfig, OptimConfig
from minillama.train.optim import build_optimizer, set_learning_rates, zero_output_projections

MODEL = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=1024, multiple_of=64, max_seq_len=128)
BATCH, SEQ = 16, 128
EVALS = 10  # validation-loss points per run, for the tokens-to-target curve
EVAL_WINDOWS = 64  # windows of SEQ tokens per held-out loss, spread over the whole split
BASELINE = OptimConfig(name="adamw", schedule="cosine", weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
SWEEP = (1e-3, 3e-3, 6e-3)
MUON_SWEEP = (0.01, 0.02, 0.04)
EMBEDDING_SWEEP = (2.0, 4.0, 8.0)
MUON_FRACTIONS = (0.25, 0.5, 1.0)  # the speedrun's Muon rate, as fractions of Muon + WSD's tuned rate
# Batch stages: until this fraction of the steps, the batch divided by this much.
STAGES = {"10%/25%": ((0.1, 4), (0.25, 2)), "25%/50%": ((0.25, 4), (0.5, 2))}


@dataclass(frozen=True)
class Recipe:
    optim: OptimConfig
    zero_init: bool = False  # zero_init_projections
    stages: tuple[tuple[int, int], ...] = ()  # batch.stages, in tokens
    # Candidates, measured here before the trainer has them: shorter sequences first (the same tokens per step),
    # windows that start at a document's BOS, attention kept inside documents.
    seq_len_stages: tuple[tuple[int, int], ...] = ()  # (until_step, seq_len)
    bos_windows: bool = False
    document_masking: bool = False


def speedrun_options(steps: int, embedding_lr: float = 4.0, stages: str = "25%/50%") -> dict[str, dict]:
    """The speedrun recipe's options, each as the changes it makes to a Muon + WSD recipe (optimizer fields, or
    the recipe's own); the schedule lengths are fractions of the run."""
    return {
        "momentum warmup": {"muon_momentum_warmup_steps": max(1, steps // 5)},
        "momentum cooldown": {"muon_momentum_cooldown_steps": max(1, steps // 10)},
        "polar express": {"muon_orthogonalization": "polar_express"},
        "muon weight decay 0.1": {"muon_weight_decay": 0.1},
        "cautious weight decay": {"muon_cautious_weight_decay": True},
        "embedding lr": {"embedding_lr_multiplier": embedding_lr},
        "zero-init projections": {"zero_init": True},
        "batch stages": {"stages": tuple((int(steps * until), BATCH // divisor * SEQ) for until, divisor in STAGES[stages])},
    }


def candidates(steps: int) -> dict[str, dict]:
    """Options added one at a time to the speedrun recipe (not yet in the trainer: each must win first)."""
    return {
        "sequence-length stages": {"seq_len_stages": ((steps // 10, SEQ // 4), (steps // 4, SEQ // 2))},
        "BOS-aligned windows": {"bos_windows": True},
        "BOS-aligned windows + document masking": {"bos_windows": True, "document_masking": True},
    }


def documents(name: str) -> list[str]:
    """A corpus as its documents: tiny shakespeare's paragraphs (as `prepare --split-paragraphs` makes them), the
    standard library's top-level modules (the first 1.5M characters' worth), the documentation's topics."""
    if name == "shakespeare":
        text = (Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data")) / "tinyshakespeare.txt").read_text()
        return [paragraph for paragraph in text.split("\n\n") if paragraph.strip()]
    if name == "docs":
        from pydoc_data.topics import topics  # the language reference's prose, as `help()` shows it

        return [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    return [text for text, before in zip(files, np.cumsum([0] + [len(f) for f in files])) if before < 1_500_000]


def splits(name: str, folder: Path) -> dict[str, np.ndarray]:
    """Train (80%), tune (10%) and validation (10%) documents by position, each document as BOS + its tokens (as
    `prepare` writes them)."""
    docs = documents(name)
    cut_tune, cut_val = int(len(docs) * 0.8), int(len(docs) * 0.9)
    (folder / f"{name}.train.txt").write_text("\n\n".join(docs[:cut_tune]))
    tokenizer = train_tokenizer([folder / f"{name}.train.txt"], MODEL.vocab_size, folder / f"{name}.model")
    encode = lambda part: np.array([t for doc in part for t in tokenizer.encode(doc)], dtype=np.int64)  # noqa: E731
    return {"train": encode(docs[:cut_tune]), "tune": encode(docs[cut_tune:cut_val]), "val": encode(docs[cut_val:]),
            "bos": np.array(tokenizer.bos_id)}


class Documents:
    """Attention kept inside documents, given to the model where a KV cache's view goes: each token sees only the
    earlier tokens of its own document (a new one starts at each BOS) and its rotary position counts from that
    document's start, as when the document is given alone."""

    def __init__(self, tokens: torch.Tensor, bos: int):
        starts = tokens == bos
        index = torch.arange(tokens.shape[1]).expand_as(tokens)
        self.positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
        document = starts.cumsum(1)
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
        self.mask = ((document[:, :, None] == document[:, None, :]) & causal)[:, None]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return keys, values


def loss_of(model: Transformer, batch: torch.Tensor, bos: int | None) -> torch.Tensor:
    """The mean next-token loss of (B, T+1) tokens; with `bos`, attention kept inside documents."""
    logits, _ = model(batch[:, :-1], cache=Documents(batch[:, :-1], bos) if bos is not None else None)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def loss_on(model: Transformer, tokens: np.ndarray, bos: int | None) -> float:
    """Mean loss over EVAL_WINDOWS windows of SEQ tokens spread evenly over the split (a fixed set): the first few
    thousand tokens alone would be one or two documents of a corpus of long ones."""
    starts = np.linspace(0, len(tokens) - SEQ - 1, EVAL_WINDOWS).astype(int)
    with torch.no_grad():
        return loss_of(model.eval(), torch.from_numpy(np.stack([tokens[s : s + SEQ + 1] for s in starts])), bos).item()


def batch_of(recipe: Recipe) -> BatchConfig:
    return BatchConfig(total_tokens=BATCH * SEQ, micro_batch=BATCH, seq_len=SEQ, stages=list(recipe.stages))


def run(data: dict[str, np.ndarray], recipe: Recipe, seed: int, steps: int, held_out: str) -> dict:
    """Train the bench model with `recipe` for `steps` steps; the held-out loss at EVALS points, by tokens seen."""
    torch.manual_seed(seed)
    model = Transformer(MODEL)
    if recipe.zero_init:
        zero_output_projections(model)
    optim = recipe.optim
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    batch = batch_of(recipe)
    bos = int(data["bos"]) if recipe.document_masking else None
    bos_starts = np.flatnonzero(data["train"][: -SEQ - 1] == data["bos"])
    batches = np.random.default_rng(seed)
    curve, tokens, started = [], 0, time.perf_counter()
    for step in range(steps):
        model.train()
        seq_len = next((length for until, length in recipe.seq_len_stages if step < until), SEQ)
        count = batch.tokens_at(step) // seq_len
        starts = (batches.choice(bos_starts, count) if recipe.bos_windows
                  else batches.integers(0, len(data["train"]) - seq_len - 1, count))
        loss = loss_of(model, torch.from_numpy(np.stack([data["train"][s : s + seq_len + 1] for s in starts])), bos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        set_learning_rates(optimizer, step, optim)
        optimizer.step()
        tokens += count * seq_len
        if (step + 1) % max(1, steps // EVALS) == 0 or step == steps - 1:
            curve.append((tokens, loss_on(model, data[held_out], bos)))
    return {"final": curve[-1][1], "curve": curve, "tokens": tokens, "seconds": time.perf_counter() - started}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which a loss curve first reaches `target`, linearly interpolated between evaluations."""
    for (t0, l0), (t1, l1) in zip([(0, float("inf"))] + curve, curve):
        if l1 <= target:
            return t1 if l0 == float("inf") else t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def swept(data: dict[str, np.ndarray], make: Callable[[float], Recipe], grid: tuple[float, ...], seed: int, steps: int, label: str,
          corpus: str) -> float:
    """The value with the lowest tune loss; a best value at an edge of the grid extends it past that edge, so the
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


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """The held-out loss curve averaged over seeds (the same tokens at each evaluation)."""
    return [(t, statistics.mean(r["curve"][i][1] for r in runs)) for i, (t, _) in enumerate(runs[0]["curve"])]


def tuned_speedrun(data: dict[str, np.ndarray], lr: float, steps: int, chosen: list[str], seeds: list[int], corpus: str,
                   grid: list[tuple[float, float, str]]) -> tuple[float, float, str]:
    """The speedrun recipe's (Muon rate, embedding multiplier, batch stages) from `grid`, picked on the tune split
    by what the goal measures: the fewest tokens for its mean tune curve to reach the baseline's mean final tune
    loss (over all seeds); ties, or none reaching it, by the final tune loss."""
    baseline = recipes(lr, grid[0][0], steps, [], [], 1.0, False)["adamw+cosine"]
    target = statistics.mean(run(data, baseline, seed, steps, "tune")["final"] for seed in seeds)
    scores = {}
    for muon_lr, embedding_lr, stages in grid:
        curve = mean_curve([run(data, recipes(lr, muon_lr, steps, chosen, [], embedding_lr, False, stages)["speedrun"], seed, steps,
                                "tune") for seed in seeds])
        needed = tokens_to_reach(curve, target)
        scores[muon_lr, embedding_lr, stages] = (math.inf if needed is None else needed, curve[-1][1])
        print(json.dumps({"corpus": corpus, "tune_muon_lr": muon_lr, "tune_embedding_lr": embedding_lr, "tune_stages": stages,
                          "adamw_tune_loss": round(target, 4), "tokens_to_reach": needed and round(needed),
                          "final_tune_loss": round(curve[-1][1], 4)}), flush=True)
    return min(scores, key=scores.get)


def recipes(lr: float, muon_lr: float, steps: int, chosen: list[str], tried: list[str], embedding_lr: float,
            ablation: bool, stages: str = "25%/50%", speedrun_muon_lr: float | None = None) -> dict[str, Recipe]:
    """The baseline, Muon + WSD, the speedrun recipe (Muon + WSD with every chosen option, at `speedrun_muon_lr`
    if given), the speedrun recipe with each of its options off in turn, and with each tried candidate added."""
    schedule = dict(max_steps=steps, warmup_steps=max(1, steps // 15))
    adamw = replace(BASELINE, lr=lr, min_lr=lr / 10, **schedule)
    muon = replace(adamw, name="muon", schedule="wsd", muon_lr=muon_lr)
    options = {name: changes for name, changes in speedrun_options(steps, embedding_lr, stages).items() if name in chosen}

    def speedrun(without: str | None = None, added: dict | None = None) -> Recipe:
        changes = {k: v for name, option in options.items() if name != without for k, v in option.items()} | (added or {})
        own = {k: changes.pop(k) for k in [f.name for f in fields(Recipe)] if k in changes}
        return Recipe(replace(muon, muon_lr=speedrun_muon_lr or muon_lr, **changes), **own)

    return {"adamw+cosine": Recipe(adamw), "muon+wsd": Recipe(muon), "speedrun": speedrun(),
            **{f"speedrun without {option}": speedrun(without=option) for option in options if ablation},
            **{f"speedrun with {name}": speedrun(added=changes) for name, changes in candidates(steps).items() if name in tried}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpora", nargs="+", default=["shakespeare", "python", "docs"])
    parser.add_argument("--options", nargs="+", default=list(speedrun_options(1)), help="the speedrun recipe's options")
    parser.add_argument("--embedding-lr", type=float, default=4.0, help="the embedding lr option's multiplier of AdamW's rate")
    parser.add_argument("--stages", choices=list(STAGES), default="25%/50%", help="the batch stages option's schedule")
    parser.add_argument("--tune-speedrun", action="store_true",
                        help="pick the speedrun's Muon rate (a quarter, half or all of Muon + WSD's) and embedding multiplier "
                             "on the tune split (all seeds)")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True, help="each option off in turn")
    parser.add_argument("--candidates", nargs="*", default=list(candidates(1)), help="options tried on top of the recipe")
    parser.add_argument("--lr", type=float, help="AdamW's rate, as an earlier sweep on the tune split found it (skips the sweep)")
    parser.add_argument("--muon-lr", type=float, help="Muon's rate, likewise")
    parser.add_argument("--speedrun-muon-lr", type=float, help="the speedrun's own Muon rate, as --tune-speedrun found it "
                                                                "(default: Muon + WSD's)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.2, 0.25, 0.33, 0.5],
                        help="fractions of --steps: Muon + WSD and the speedrun recipe trained for that many steps, their schedules scaled")
    parser.add_argument("--equal-tokens", action="store_true",
                        help="also train the speedrun recipe for as many steps as make the baseline's tokens, schedules scaled")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="1 per corpus when running corpora side by side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schedule = dict(max_steps=args.steps, warmup_steps=max(1, args.steps // 15))
    total = args.steps * BATCH * SEQ
    with tempfile.TemporaryDirectory() as folder:
        for corpus in args.corpora:
            data = splits(corpus, Path(folder))
            lr = args.lr or swept(data, lambda v: Recipe(replace(BASELINE, lr=v, min_lr=v / 10, **schedule)), SWEEP, args.seeds[0],
                                  args.steps, "lr", corpus)
            muon_lr = args.muon_lr or swept(data, lambda v: Recipe(replace(BASELINE, name="muon", schedule="wsd", lr=lr, min_lr=lr / 10,
                                                                           muon_lr=v, **schedule)), MUON_SWEEP, args.seeds[0],
                                            args.steps, "muon_lr", corpus)
            speedrun_muon_lr, embedding_lr, stages = args.speedrun_muon_lr or muon_lr, args.embedding_lr, args.stages
            if args.tune_speedrun:
                grid = [(muon_lr * f, e, stages) for f in MUON_FRACTIONS for e in EMBEDDING_SWEEP]
                speedrun_muon_lr, embedding_lr, stages = tuned_speedrun(data, lr, args.steps, args.options, args.seeds, corpus, grid)
            results: dict[str, list[dict]] = {}
            for name, recipe in recipes(lr, muon_lr, args.steps, args.options, args.candidates, embedding_lr, args.ablation,
                                         stages, speedrun_muon_lr).items():
                for seed in args.seeds:
                    result = run(data, recipe, seed, args.steps, "val")
                    results.setdefault(name, []).append(result)
                    print(json.dumps({"corpus": corpus, "recipe": name, "seed": seed, "final_val_loss": round(result["final"], 4),
                                      "seconds": round(result["seconds"], 1)}), flush=True)
            target = statistics.mean(r["final"] for r in results["adamw+cosine"])

            def planned(name: str, steps: int) -> Recipe:  # the recipe with every schedule scaled to a run of `steps`
                return recipes(lr, muon_lr, steps, args.options, [], embedding_lr, False, stages, speedrun_muon_lr)[name]

            budgets = {}
            for name in ("muon+wsd", "speedrun"):
                for fraction in args.budgets:  # a shorter run of its own, as a speedrun config sets max_steps
                    steps = round(args.steps * fraction)
                    recipe = planned(name, steps)
                    runs = [run(data, recipe, seed, steps, "val") for seed in args.seeds]
                    finals = [r["final"] for r in runs]
                    budgets.setdefault(name, []).append(
                        {"steps": steps, "ratio": round(runs[0]["tokens"] / total, 3), "final_val_loss": round(statistics.mean(finals), 4),
                         "spread": round(max(finals) - min(finals), 4), "reaches": statistics.mean(finals) <= target})
                    print(json.dumps({"corpus": corpus, "recipe": name, "own_steps": steps, "finals": [round(f, 4) for f in finals]}),
                          flush=True)
            if args.equal_tokens:  # its stages make the first steps smaller: more steps for the same tokens
                steps = next(n for n in range(args.steps, 4 * args.steps)
                             if batch_of(planned("speedrun", n)).tokens_between(0, n) >= total)
                runs = [run(data, planned("speedrun", steps), seed, steps, "val") for seed in args.seeds]
                results[f"speedrun, {steps} steps"] = runs
                print(json.dumps({"corpus": corpus, "recipe": "speedrun", "equal_token_steps": steps,
                                  "finals": [round(r["final"], 4) for r in runs]}), flush=True)
            summary = {}
            for name, runs in results.items():
                needed = tokens_to_reach(mean_curve(runs), target)
                finals = [r["final"] for r in runs]
                summary[name] = {"final_val_loss": round(statistics.mean(finals), 4), "spread": round(max(finals) - min(finals), 4),
                                 "tokens": runs[0]["tokens"],
                                 "tokens_to_adamw_final": needed and round(needed), "ratio": needed and round(needed / total, 3)}
            print(json.dumps({"corpus": corpus, "tokens_per_run": total, "tuned_adamw_lr": lr, "tuned_muon_lr": muon_lr,
                              "speedrun_muon_lr": speedrun_muon_lr, "embedding_lr": embedding_lr, "stages": stages,
                              "model": f"dim {MODEL.dim}, {MODEL.n_layers} layers", "recipes": summary,
                              "own_schedule": budgets,
                              "own_schedule_ratio": {name: min((b["ratio"] for b in rows if b["reaches"]), default=None)
                                                     for name, rows in budgets.items()},
                              "goal": "speedrun ratio <= 0.25"}), flush=True)


if __name__ == "__main__":
    main()
