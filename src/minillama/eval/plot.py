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
from minillama.files import claim_remade_output, write_file_atomically
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
    sessions: list[dict[str, Any]] = field(default_factory=list)  # where each start or resume began

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
    tokenizer = tokenizer_label(run)
    return RunCurves(
        name=Path(run_dir).resolve().name, tokenizer=tokenizer, tokens_per_step=run.get("tokens_per_step"),
        train=[r for r in usable if r["kind"] == "train"],
        evals=[_without_partial_hellaswag(r) for r in usable if r["kind"] == "eval"],
        samples=[r for r in usable if r["kind"] == "samples" and isinstance(r.get("samples"), list)], run=run,
        sessions=[r for r in usable if r["kind"] == "session"],
    )


def tokenizer_label(run: dict[str, Any]) -> str:
    """A run's tokenizer by what tells tokenizers apart, its vocabulary size and fingerprint (two files named
    tokenizer.model are alike by name only): "Llama 2, vocab 32000" or "vocab 512, sha256 1a2b3c4d"."""
    vocab, fingerprint = run.get("vocab_size", "?"), run.get("tokenizer_sha256")
    if fingerprint == LLAMA2_TOKENIZER_SHA256:
        return f"Llama 2, vocab {vocab}"
    return f"vocab {vocab}, sha256 {fingerprint[:8]}" if isinstance(fingerprint, str) else f"vocab {vocab}"


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


HELLASWAG_CHANCE = 0.25  # one of four endings


def _reference_line(ax, index: int, label: str, value: float, text: str, at_left: bool = False) -> None:
    """A horizontal line in a style of its own, named in the legend and at one end (`at_left`: the left end, so
    that lines close together are named at alternate ends rather than over each other)."""
    color, style = REFERENCE_STYLES[index % len(REFERENCE_STYLES)]
    ax.axhline(value, color=color, linestyle=style, linewidth=1, label=f"{label}: {text}")
    ax.annotate(label, xy=(0 if at_left else 1, value), xycoords=("axes fraction", "data"), xytext=(4 if at_left else -4, 2),
                textcoords="offset points", ha="left" if at_left else "right", va="bottom", fontsize=6, color=color)


PLOT_TITLE = "Mini Llama training curves"  # in every image's metadata: how a later plot knows it may replace it
IMAGE_FORMATS = ("png", "svg", "pdf")
MAX_PLOT_BYTES = 32 << 20  # far above any curves image; a larger file is not one


def plot_runs(run_dirs: list[Path], out: Path, smoothing: float = 0.9) -> Path:
    """Draw the runs' curves into the image `out`, in the format its suffix names (PNG without one); a file there is
    replaced only if an earlier plot made it."""
    if Path(out).is_dir():
        raise MiniLlamaError(f"{out} is a directory; give the image's file name, e.g. {Path(out) / 'curves.png'}")
    claim_remade_output(Path(out), "plot", is_plot)
    return draw_curves(run_dirs, Path(out), smoothing)


def draw_curves(run_dirs: list[Path], out: Path, smoothing: float = 0.9) -> Path:
    """`plot_runs` for a caller that has already decided that `out` may be written."""
    if not 0 <= smoothing < 1:
        raise MiniLlamaError(f"smoothing is {smoothing}; expected a number in [0, 1) (0: none, 0.9: the default)")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out = Path(out)
    image_format = out.suffix.lstrip(".").lower() or "png"
    if image_format not in IMAGE_FORMATS:
        raise MiniLlamaError(f"{out}: plots are written as .png, .svg or .pdf (formats whose metadata marks the file as a "
                             f"plot), not .{image_format}; name the file .png, .svg or .pdf")
    fig = curves_figure([load_run(Path(d)) for d in run_dirs], smoothing)
    image = io.BytesIO()
    fig.savefig(image, format=image_format, dpi=120, metadata={"Title": PLOT_TITLE})
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomically(out, image.getbuffer())


def is_plot(path: Path) -> bool:
    """An image `plot_runs` drew: PNG, SVG and PDF all carry its title in their metadata, as plain text."""
    try:
        with open(path, "rb") as f:
            return PLOT_TITLE.encode() in f.read(MAX_PLOT_BYTES)
    except OSError:
        return False


def curves_figure(runs: list[RunCurves], smoothing: float = 0.9):
    """A matplotlib Figure with panels for loss, validation bits per byte and, when any run has it, HellaSwag."""
    import matplotlib.pyplot as plt

    with_hellaswag = any("hellaswag_acc_norm" in r for run in runs for r in run.evals)
    fig, axes = plt.subplots(1, 3 if with_hellaswag else 2, figsize=(19 if with_hellaswag else 13, 5.5))
    loss_ax, bpb_ax, hella_ax = (*axes, None)[:3]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        steps = [r["step"] for r in run.train]
        losses = [r["loss"] for r in run.train]
        loss_ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8, label=f"{run.name} train, each step")
        loss_ax.plot(steps, smooth(losses, smoothing), color=color, label=f"{run.name} train, smoothed ({run.tokenizer})")
        if run.evals:
            eval_steps = [r["step"] for r in run.evals]
            loss_ax.plot(eval_steps, [r["val_loss"] for r in run.evals], color=color, linestyle="--", marker=".",
                         label=f"{run.name} val ({run.tokenizer})")
            bpb_ax.plot(eval_steps, [r["val_bits_per_byte"] for r in run.evals], color=color, marker=".", label=run.name)
        hella = [r for r in run.evals if "hellaswag_acc_norm" in r]
        if hella:
            hella_ax.plot([r["step"] for r in hella], [r["hellaswag_acc_norm"] for r in hella], color=color, marker=".", label=run.name)
    if all(run.like_reference for run in runs):  # per-token losses compare only within one tokenizer and data
        label, value = REFERENCE_VAL_LOSS
        _reference_line(loss_ax, 0, label, value, f"{value} (Llama 2 tokenizer, FineWeb-Edu)")
    loss_ax.set(title="Loss (per token; comparable only within a tokenizer)", xlabel="step", ylabel="loss (nats/token)")
    bpb_ax.set(title="Validation bits per byte (comparable across tokenizers)", xlabel="step", ylabel="bits per UTF-8 byte")
    if with_hellaswag:
        _hellaswag_panel(hella_ax, runs)
    else:
        fig.suptitle("No HellaSwag evaluations in these runs, so no HellaSwag panel (eval.hellaswag = true adds them)",
                     fontsize=9, color="dimgray")
    panels = [ax for ax in (loss_ax, bpb_ax, hella_ax) if ax is not None]
    for ax in panels[1:]:
        ax.set_xlim(loss_ax.get_xlim())
    tokens_per_step = runs[0].tokens_per_step
    if tokens_per_step and all(r.tokens_per_step == tokens_per_step for r in runs):
        most_tokens = max((r.train[-1]["tokens_seen"] for r in runs if r.train), default=0)
        scale, unit = (1e9, "billions") if most_tokens >= 1e9 else (1e6, "millions")
        for ax in panels:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / scale, lambda t: t * scale / tokens_per_step))
            top.set_xlabel(f"tokens seen ({unit})")
    for ax in panels:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _hellaswag_panel(ax, runs: list[RunCurves]) -> None:
    """The published HellaSwag numbers as lines (named at alternate ends in order of value, so that close ones do not
    overlap) and chance, under the runs' curves."""
    by_value = sorted(range(len(REFERENCE_HELLASWAG)), key=lambda i: REFERENCE_HELLASWAG[i][1])
    for rank, index in enumerate(by_value):
        label, value = REFERENCE_HELLASWAG[index]
        _reference_line(ax, index, label, value, f"{value:.2%}", at_left=rank % 2 == 1)
    ax.axhline(HELLASWAG_CHANCE, color="lightgray", linewidth=1.5, label=f"chance (one of four endings): {HELLASWAG_CHANCE:.0%}")
    ax.set(title="HellaSwag acc_norm (completion-style scoring)", xlabel="step", ylabel="accuracy")
    best = max((r.get("hellaswag_acc_norm", 0.0) for run in runs for r in run.evals), default=0.0)
    ax.set_ylim(0.2, max(0.36, best + 0.02))
