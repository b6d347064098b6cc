"""Training curves from runs' metrics.jsonl: loss (raw and smoothed) and validation loss, validation bits per
byte, and HellaSwag accuracy, against optimizer steps (bottom axis) and tokens seen (top axis), with the published
results drawn in where they are comparable."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.data.sources import FineWebEdu
from minillama.errors import MiniLlamaError
from minillama.files import write_file_atomically
from minillama.metrics import read_metrics
from minillama.tokenizer import LLAMA2_TOKENIZER_SHA256

# The reference run's min val loss, per token of the Llama 2 tokenizer on FineWeb-Edu sample-10BT's validation
# tokens: comparable only with runs on that tokenizer and that data (GPT-2's 3.0726 is per GPT-2 token, never).
REFERENCE_VAL_LOSS = ("reference mini-llama-109M", 2.7095)
REFERENCE_DATA = FineWebEdu("sample-10BT").describe()
# HellaSwag acc_norm, completion-style as Mini Llama scores it: comparable with any run.
REFERENCE_HELLASWAG = [
    ("reference mini-llama-109M", 0.3034),
    ("GPT-2 124M reproduction", 0.3068),
    ("OpenAI GPT-2 124M", 0.2945),
    ("OpenAI GPT-3 124M", 0.337),
]
REFERENCE_STYLES = [("black", ":"), ("tab:brown", "-."), ("tab:gray", "--"), ("tab:olive", (0, (1, 3)))]


@dataclass
class RunCurves:
    name: str
    tokenizer: str
    tokens_per_step: int | None
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def like_reference(self) -> bool:
        """Trained with the reference run's tokenizer on its data, so its per-token val loss compares with 2.7095."""
        return self.run.get("tokenizer_sha256") == LLAMA2_TOKENIZER_SHA256 and self.run.get("data_source") == REFERENCE_DATA


# The fields each kind of record must hold, as numbers, to be drawn; a record without them (written by hand, or
# by another tool) is passed over like a garbage line.
REQUIRED_NUMBERS = {"train": ("loss", "tokens_seen"), "eval": ("val_loss", "val_bits_per_byte")}


def load_run(run_dir: Path) -> RunCurves:
    records = read_metrics(run_dir)
    if not records:
        raise MiniLlamaError(f"{run_dir}/metrics.jsonl holds no records yet")
    usable = [r for r in records if all(_is_number(r.get(name)) for name in REQUIRED_NUMBERS.get(r["kind"], ()))]
    run = next((r for r in usable if r["kind"] == "run"), {})
    tokenizer = f"{run.get('tokenizer', 'unknown tokenizer')}, vocab {run.get('vocab_size', '?')}"
    return RunCurves(
        name=Path(run_dir).resolve().name, tokenizer=tokenizer, tokens_per_step=run.get("tokens_per_step"),
        train=[r for r in usable if r["kind"] == "train"],
        evals=[_without_partial_hellaswag(r) for r in usable if r["kind"] == "eval"],
        samples=[r for r in usable if r["kind"] == "samples" and isinstance(r.get("samples"), list)], run=run,
    )


def _without_partial_hellaswag(record: dict) -> dict:
    """An eval record's HellaSwag figures are kept only whole: accuracy and example count, both numbers."""
    if all(_is_number(record.get(name)) for name in ("hellaswag_acc_norm", "hellaswag_examples")):
        return record
    return {key: value for key, value in record.items() if not key.startswith("hellaswag_")}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled toward zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def _reference_line(ax, index: int, label: str, value: float, text: str) -> None:
    """A horizontal line in a style of its own, named in the legend and at its right end."""
    color, style = REFERENCE_STYLES[index % len(REFERENCE_STYLES)]
    ax.axhline(value, color=color, linestyle=style, linewidth=1, label=f"{label}: {text}")
    ax.annotate(label, xy=(1, value), xycoords=("axes fraction", "data"), xytext=(-4, 2), textcoords="offset points",
                ha="right", va="bottom", fontsize=6, color=color)


def plot_runs(run_dirs: list[Path], out: Path, smoothing: float = 0.9) -> Path:
    """Draw the runs' curves into the image `out`, in the format its suffix names (PNG without one)."""
    if not 0 <= smoothing < 1:
        raise MiniLlamaError(f"smoothing is {smoothing}; expected a number in [0, 1) (0: none, 0.9: the default)")
    if Path(out).is_dir():
        raise MiniLlamaError(f"{out} is a directory; give the image's file name, e.g. {Path(out) / 'curves.png'}")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out)
    image_format = out.suffix.lstrip(".").lower() or "png"
    if image_format not in FigureCanvasAgg.get_supported_filetypes():
        raise MiniLlamaError(f"{out}: matplotlib cannot write .{image_format} images; name the file .png, .svg or .pdf")
    fig = curves_figure([load_run(Path(d)) for d in run_dirs], smoothing)
    image = io.BytesIO()
    fig.savefig(image, format=image_format, dpi=120)
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomically(out, image.getbuffer())


def curves_figure(runs: list[RunCurves], smoothing: float = 0.9):
    """A matplotlib Figure with three panels: loss, validation bits per byte, HellaSwag."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, bpb_ax, hella_ax) = plt.subplots(1, 3, figsize=(19, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        steps = [r["step"] for r in run.train]
        losses = [r["loss"] for r in run.train]
        loss_ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        loss_ax.plot(steps, smooth(losses, smoothing), color=color, label=f"{run.name} train ({run.tokenizer})")
        if run.evals:
            eval_steps = [r["step"] for r in run.evals]
            loss_ax.plot(eval_steps, [r["val_loss"] for r in run.evals], color=color, linestyle="--", marker=".",
                         label=f"{run.name} val ({run.tokenizer})")
            bpb_ax.plot(eval_steps, [r["val_bits_per_byte"] for r in run.evals], color=color, marker=".", label=run.name)
        hella = [r for r in run.evals if "hellaswag_acc_norm" in r]
        if hella:
            hella_ax.plot([r["step"] for r in hella], [r["hellaswag_acc_norm"] for r in hella], color=color, marker=".", label=run.name)
    if any(run.like_reference for run in runs):
        label, value = REFERENCE_VAL_LOSS
        _reference_line(loss_ax, 0, label, value, f"{value} (Llama 2 tokenizer, FineWeb-Edu)")
    for index, (label, value) in enumerate(REFERENCE_HELLASWAG):
        _reference_line(hella_ax, index, label, value, f"{value:.2%}")
    if not any("hellaswag_acc_norm" in r for run in runs for r in run.evals):
        hella_ax.text(0.5, 0.5, "no HellaSwag evaluations in these runs\n(eval.hellaswag = true to add them)",
                      transform=hella_ax.transAxes, ha="center", va="center", fontsize=9, color="dimgray")
    loss_ax.set(title="Loss (per token; comparable only within a tokenizer)", xlabel="step", ylabel="loss (nats/token)")
    bpb_ax.set(title="Validation bits per byte (comparable across tokenizers)", xlabel="step", ylabel="bits per UTF-8 byte")
    hella_ax.set(title="HellaSwag acc_norm (completion-style scoring)", xlabel="step", ylabel="accuracy")
    for ax in (bpb_ax, hella_ax):
        ax.set_xlim(loss_ax.get_xlim())
    best_hellaswag = max((r.get("hellaswag_acc_norm", 0.0) for run in runs for r in run.evals), default=0.0)
    hella_ax.set_ylim(0.2, max(0.36, best_hellaswag + 0.02))
    tokens_per_step = runs[0].tokens_per_step
    if tokens_per_step and all(r.tokens_per_step == tokens_per_step for r in runs):
        most_tokens = max((r.train[-1]["tokens_seen"] for r in runs if r.train), default=0)
        scale, unit = (1e9, "billions") if most_tokens >= 1e9 else (1e6, "millions")
        for ax in (loss_ax, bpb_ax, hella_ax):
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / scale, lambda t: t * scale / tokens_per_step))
            top.set_xlabel(f"tokens seen ({unit})")
    for ax in (loss_ax, bpb_ax, hella_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
