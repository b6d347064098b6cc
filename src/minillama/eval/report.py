"""A Markdown summary of a training run, in the shape of the reference README's results section."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from minillama.errors import MiniLlamaError
from minillama.files import claim_remade_output, write_file_atomically
from minillama.eval.plot import (
    HELLASWAG_CHANCE,
    REFERENCE_HELLASWAG,
    REFERENCE_VAL_LOSS,
    draw_curves,
    load_run,
)
from minillama.layout import harness_results


REPORT_TITLE = "# Run report: "


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """RUN_DIR/report.md (or `out`) with the run's key numbers, and its curves beside it as NAME_curves.png (see
    `curves_path`)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = Path(out) if out else run_dir / "report.md"
    claim_remade_output(out, "report", is_report)
    curves = draw_curves([run_dir], curves_path(out))

    lines = [f"{REPORT_TITLE}{run.name}", ""]
    info = run.run
    if info:
        lines += [f"- model: {info.get('model_preset')}, {info.get('parameters', 0):,} parameters",
                  f"- tokenizer: {run.tokenizer}",
                  f"- hardware: {info.get('world_size')} x {info.get('device')}, {info.get('tokens_per_step', 0):,} tokens per step"]
    if run.train:
        last = run.train[-1]
        timed = [r for r in run.train if all(isinstance(r.get(k), (int, float)) for k in ("step_time_s", "tokens_per_s"))]
        sessions = run.sessions
        planned = sessions[-1].get("planned_steps") if sessions else None
        progress = f" of {planned:,} planned" + (", incomplete" if last["step"] + 1 < planned else "") if isinstance(planned, int) else ""
        lines += [f"- steps: {last['step'] + 1:,}{progress}; tokens seen: {last['tokens_seen']:,}",
                  f"- min train loss: {min(r['loss'] for r in run.train):.4f}"]
        if timed:
            mfu = [r["mfu"] for r in timed if isinstance(r.get("mfu"), (int, float))]
            lines += [
                f"- throughput: {statistics.median(r['tokens_per_s'] for r in timed):,.0f} tokens/s (median over steps)"
                + (f", MFU {statistics.median(mfu):.1%}" if mfu else ""),
                f"- training time: {sum(r['step_time_s'] for r in timed) / 3600:.2f} h in optimizer steps"
                + (f"; wall time {wall / 3600:.2f} h" if (wall := wall_time_s(run.train, sessions)) is not None else ""),
            ]
    if run.evals:
        best = min(run.evals, key=lambda r: r["val_loss"])
        lines.append(f"- min val loss: {best['val_loss']:.4f} at step {best['step']:,} "
                     f"({best['val_bits_per_byte']:.4f} bits per byte, comparable across tokenizers)")
        hella = [r for r in run.evals if "hellaswag_acc_norm" in r]
        if hella:
            top = max(hella, key=lambda r: r["hellaswag_acc_norm"])
            lines.append(f"- best HellaSwag acc_norm: {top['hellaswag_acc_norm']:.2%} at step {top['step']:,} "
                         f"({top['hellaswag_examples']:,} examples; completion-style scoring, not the lm-evaluation-harness number)")
    label, value = REFERENCE_VAL_LOSS
    comparisons = [f"{label} val loss {value} (same tokenizer and data as this run)" if run.like_reference else
                   "val loss is comparable with the reference run's only on its tokenizer and data (bits per byte compares "
                   "across tokenizers)"]
    if any("hellaswag_acc_norm" in r for r in run.evals):
        comparisons.append("HellaSwag " + ", ".join(f"{label} {value:.2%}" for label, value in REFERENCE_HELLASWAG)
                           + f" (chance {HELLASWAG_CHANCE:.0%})")
    lines += ["", "For comparison: " + "; ".join(comparisons) + ".", "", f"![training curves]({curves.name})", ""]
    lines += harness_section(run_dir, any("hellaswag_acc_norm" in r for r in run.evals))
    if run.samples:
        last_samples = run.samples[-1]
        lines += [f"## Samples at step {last_samples['step']:,}", ""]
        for i, text in enumerate(last_samples["samples"]):
            lines += [f"Sample {i}:", "", text_block(str(text)), ""]
    return write_file_atomically(out, "\n".join(lines).encode())


def is_report(path: Path) -> bool:
    """A report this module wrote: a text file that starts with its title."""
    try:
        with open(path, "rb") as f:
            return f.read(len(REPORT_TITLE.encode())) == REPORT_TITLE.encode()
    except OSError:
        return False


def wall_time_s(train: list[dict], sessions: list[dict]) -> float | None:
    """Seconds the run trained by the clock, summed over its sessions (each start or resume to its last step), so
    that hours it stood stopped between them do not count; a run logged before sessions were recorded: first to last."""
    timed = [r for r in train if isinstance(r.get("time"), (int, float))]
    if not timed:
        return None
    starts = [r for r in sessions if isinstance(r.get("time"), (int, float))]
    if not starts:
        return timed[-1]["time"] - timed[0]["time"]
    total = 0.0
    for start, end in zip(starts, [*starts[1:], None]):
        inside = [r["time"] for r in timed if r["time"] >= start["time"] and (end is None or r["time"] < end["time"])]
        total += max(inside) - start["time"] if inside else 0.0
    return total


def text_block(text: str) -> str:
    """`text` as a Markdown code block, shown as written (line breaks, spaces, markup); its fence is longer than any
    run of backticks inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def curves_path(report: Path) -> Path:
    """Where a report's image goes: REPORT_curves.png beside it. An image there is replaced only when an earlier
    report at the same path made it (it links to it); any other file of that name is the user's and stays."""
    image = report.with_name(f"{report.stem}_curves.png")
    made_by_earlier_report = report.is_file() and f"]({image.name})" in report.read_text(errors="replace")
    if image.exists() and not made_by_earlier_report:
        raise MiniLlamaError(f"{image} exists and no earlier report at {report} made it; move it away, or write the report "
                             "under another name (-o)")
    return image


def harness_section(run_dir: Path, with_own_hellaswag: bool) -> list[str]:
    """The newest `minillama eval harness` results of the run (RUN_DIR/harness/step_N.json), as a table; how its
    HellaSwag differs from Mini Llama's own when the report shows both."""
    files = harness_results(run_dir)
    if not files:
        return []
    try:
        saved = json.loads(files[-1].read_text())
        results = saved["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"(harness results in {files[-1]} cannot be read)", ""]
    lines = [f"## lm-evaluation-harness, {files[-1].stem}", ""]
    if with_own_hellaswag and any(task.startswith("hellaswag") for task in results):
        lines += ["Mini Llama's own HellaSwag above is completion-style (mean loss per ending token); the harness's "
                  "hellaswag acc_norm normalises by the ending's length in bytes, so the two differ for the same model.", ""]
    lines += ["| task | metric | value | stderr |", "| --- | --- | --- | --- |"]
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _ = key.split(",", 1)
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            lines.append(f"| {task} | {metric} | {value:.4f} | {stderr:.4f} |" if isinstance(stderr, (int, float))
                         else f"| {task} | {metric} | {value:.4f} | |")
    return [*lines, ""]
