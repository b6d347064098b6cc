"""One Markdown table from the JSON lines of a `bench/gpu_check.sh` log: each figure beside its target.

usage: python bench/gpu_report.py GPU_CHECK_LOG
"""

import json
import sys
from pathlib import Path


def records(log: Path) -> list[dict]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "MISSED")


def main() -> None:
    found = records(Path(sys.argv[1]))
    rows: list[tuple[str, str, str, str]] = []
    device = next((r for r in found if r.get("check") == "device"), {})

    for r in (r for r in found if r.get("bench") == "train" and "tokens_per_s" in r):
        target = r["compiled"] and r["batch"] == 32 and r["seq"] == 1024
        layout = "".join(f", {value}" for value in (r.get("parallel"), r.get("activation_checkpointing"))
                         if value not in (None, "ddp", "none")) + (" checkpointing" if r.get("activation_checkpointing", "none") != "none" else "")
        target = target and not layout
        rows.append((f"training {r['batch']} x {r['seq']}, {'compiled' if r['compiled'] else 'eager'}{layout}",
                     ">= 600,000 tokens/s (goal 800,000)" if target else "",
                     f"{r['tokens_per_s']:,} tokens/s, MFU {r['mfu']}, {r['step_ms']} ms/step, peak {r['peak_memory_gib']} GiB "
                     f"(estimate {r.get('estimated_memory_gib')} GiB), warm-up {r['warmup_s']} s",
                     verdict(r["tokens_per_s"] >= 600_000) if target else ""))
    for r in (r for r in found if r.get("check") == "train_run"):
        if "error" in r:
            rows.append((r["name"], "runs, loss falls, resumes", r["error"], "MISSED"))
            continue
        if r["name"].startswith("recipe A/B"):
            rows.append((r["name"], "runs compiled, loss falls; val losses side by side",
                         f"loss {r['first_loss']} -> {r['last_loss']}, val loss {r['val_loss']} at steps {r['eval_steps']}, "
                         f"median {r['median_tokens_per_s']:,} tokens/s", verdict(r["contiguous"] and r["last_loss"] < r["first_loss"])))
            continue
        if r.get("micro_batch_estimate_gib") is not None:  # batch.micro_batch = auto
            fits = r["peak_memory_gib"] is None or r["peak_memory_gib"] <= 1.05 * r["micro_batch_estimate_gib"]
            rows.append((r["name"], "runs; peak within 5% of the estimate",
                         f"picked {r['micro_batch']} (estimate {r['micro_batch_estimate_gib']} GiB), peak {r['peak_memory_gib']} GiB, "
                         f"loss {r['first_loss']} -> {r['last_loss']}, median {r['median_tokens_per_s']:,} tokens/s",
                         verdict(r["contiguous"] and fits)))
            continue
        ok = r["contiguous"] and r["last_loss"] < r["first_loss"] and len(r["checkpoints"]) >= 2 and None not in r["hellaswag"]
        rows.append((r["name"], "runs, loss falls, resumes",
                     f"{r['steps']} steps (contiguous: {r['contiguous']}), loss {r['first_loss']} -> {r['last_loss']}, "
                     f"val loss {r['val_loss']} at steps {r['eval_steps']}, HellaSwag {r['hellaswag']}, "
                     f"checkpoints {r['checkpoints']}, median {r['median_tokens_per_s']:,} tokens/s", verdict(ok)))
        if r["last_samples"]:
            rows.append(("samples at the end of the run", "readable", " / ".join(repr(s) for s in r["last_samples"]), ""))
    for r in (r for r in found if r.get("bench") == "generate" and "new_tokens_per_s" in r):
        target = r["batch"] == 4 and r["impl"] == "minillama cached+graph"
        rows.append((f"generation, batch {r['batch']}, {r['new_tokens']} new tokens, {r['impl']}",
                     ">= 1,000 new tokens/s (goal 2,000)" if target else "",
                     f"{r['new_tokens_per_s']:,} new tokens/s" + (f" (first call {r['first_call_s']} s)" if "first_call_s" in r else "")
                     + (f", first difference from minillama per row {r['first_difference_from_minillama']}"
                        if "first_difference_from_minillama" in r else ""),
                     verdict(r["new_tokens_per_s"] >= 1000) if target else ""))
    for r in (r for r in found if "equal" in r):
        rows.append((f"{r['check']}, batch {r['batch']}", "identical greedy tokens", f"first difference per row {r['first_difference']}",
                     verdict(r["equal"])))
    for r in (r for r in found if r.get("bench") == "hellaswag"):
        seconds_full = r["seconds"] * 10_042 / r["examples"]
        rows.append((f"HellaSwag scoring, {r['mode']}, batch {r['batch_size']}", "<= 15 s for 10,042 (goal 10 s)",
                     f"{r['examples_per_s']:,} examples/s, {seconds_full:.1f} s for 10,042", verdict(seconds_full <= 15)))
    for r in (r for r in found if r.get("bench") == "muon overhead"):
        rows.append(("Muon's optimizer step vs AdamW's", "a small fraction of a 524,288-token step",
                     f"{r['muon_step_s']} s vs {r['adamw_step_s']} s; {r['muon_overhead_fraction']:.2%} of a {r['training_step_s']} s step",
                     verdict(r["muon_overhead_fraction"] < 0.05)))
    for r in (r for r in found if r.get("bench") == "serve load"):
        rows.append((f"server, {r['clients']} clients, {r['requests']} requests of {r['max_tokens']} tokens", "",
                     f"{r['completion_tokens_per_s']:,} tokens/s, p50 {r['p50_latency_s']} s, p99 {r['p99_latency_s']} s, "
                     f"{r['failures']} failures", verdict(r["failures"] == 0)))
    for r in (r for r in found if r.get("bench") == "head of line"):
        rows.append(("server, 8 short requests beside a long one", "< 0.35 of the long one's time alone",
                     f"{r['short_over_long']} ({r['short_median_s']} s vs {r['long_alone_s']} s)", verdict(r["short_over_long"] < 0.35)))
    for r in (r for r in found if "part" in r and (r.get("exit_code") or "skipped" in r)):
        rows.append((f"part {r['part']}", "exit 0", r.get("skipped") or f"exit code {r['exit_code']} after {r['seconds']} s", "MISSED"))

    print(f"Device: {device.get('gpu')}, PyTorch {device.get('torch')}, CUDA {device.get('cuda')}\n")
    print("| figure | target | measured | verdict |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")


if __name__ == "__main__":
    main()
