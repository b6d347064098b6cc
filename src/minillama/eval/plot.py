"""Training curves from runs' metrics.jsonl: loss (raw and smoothed), validation loss and HellaSwag accuracy,
against optimizer steps (bottom axis) and tokens seen (top axis), with the reference results drawn in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.errors import MiniLlamaError
from minillama.train.metrics import read_metrics

# (label, value) of published results. Losses are per token of their own tokenizer and only comparable within one.
REFERENCE_VAL_LOSS = [
    ("reference mini-llama-109M, Llama 2 tokenizer", 2.7095),
    ("GPT-2 124M reproduction, GPT-2 tokenizer", 3.0726),
]
REFERENCE_HELLASWAG = [
    ("reference mini-llama-109M", 0.3034),
    ("GPT-2 124M reproduction", 0.3068),
    ("OpenAI GPT-2 124M", 0.2945),
    ("OpenAI GPT-3 124M", 0.337),
]


@dataclass
class RunCurves:
    name: str
    tokenizer: str
    tokens_per_step: int | None
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)


def load_run(run_dir: Path) -> RunCurves:
    records = read_metrics(run_dir)
    if not records:
        raise MiniLlamaError(f"{run_dir}/metrics.jsonl holds no records yet")
    run = next((r for r in records if r["kind"] == "run"), {})
    tokenizer = f"{run.get('tokenizer', 'unknown tokenizer')}, vocab {run.get('vocab_size', '?')}"
    return RunCurves(
        name=Path(run_dir).resolve().name, tokenizer=tokenizer, tokens_per_step=run.get("tokens_per_step"),
        train=[r for r in records if r["kind"] == "train"], evals=[r for r in records if r["kind"] == "eval"],
        samples=[r for r in records if r["kind"] == "samples"], run=run,
    )


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled toward zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_runs(run_dirs: list[Path], out: Path, smoothing: float = 0.9) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = [load_run(Path(d)) for d in run_dirs]
    fig, (loss_ax, hella_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        steps = [r["step"] for r in run.train]
        losses = [r["loss"] for r in run.train]
        loss_ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        loss_ax.plot(steps, smooth(losses, smoothing), color=color, label=f"{run.name} train ({run.tokenizer})")
        if run.evals:
            loss_ax.plot([r["step"] for r in run.evals], [r["val_loss"] for r in run.evals], color=color,
                         linestyle="--", marker=".", label=f"{run.name} val ({run.tokenizer})")
        hella = [r for r in run.evals if "hellaswag_acc_norm" in r]
        if hella:
            hella_ax.plot([r["step"] for r in hella], [r["hellaswag_acc_norm"] for r in hella], color=color, marker=".", label=run.name)
    for (label, value), style in zip(REFERENCE_VAL_LOSS, (":", "-.")):
        loss_ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{label}: {value}")
    for (label, value), style in zip(REFERENCE_HELLASWAG, (":", "-.", "--", (0, (1, 3)))):
        hella_ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=f"{label}: {value:.2%}")
    loss_ax.set(title="Loss (per token; comparable only within a tokenizer)", xlabel="step", ylabel="loss (nats/token)")
    hella_ax.set(title="HellaSwag acc_norm (completion-style scoring)", xlabel="step", ylabel="accuracy")
    hella_ax.set_xlim(loss_ax.get_xlim())
    best_hellaswag = max((r.get("hellaswag_acc_norm", 0.0) for run in runs for r in run.evals), default=0.0)
    hella_ax.set_ylim(0.2, max(0.36, best_hellaswag + 0.02))
    tokens_per_step = runs[0].tokens_per_step
    if tokens_per_step and all(r.tokens_per_step == tokens_per_step for r in runs):
        most_tokens = max((r.train[-1]["tokens_seen"] for r in runs if r.train), default=0)
        scale, unit = (1e9, "billions") if most_tokens >= 1e9 else (1e6, "millions")
        for ax in (loss_ax, hella_ax):
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / scale, lambda t: t * scale / tokens_per_step))
            top.set_xlabel(f"tokens seen ({unit})")
    for ax in (loss_ax, hella_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
