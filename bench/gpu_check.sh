#!/usr/bin/env bash
# Everything GPU-specific in one go, in under 5 minutes (each part has a time limit, and parts that no longer fit
# in the budget are skipped and reported as such); ends with one table (bench/gpu_report.py).
# Needs PyTorch with CUDA, transformers, sentencepiece, safetensors, numpy, tqdm; no network, no `datasets`.
#
#   mkdir -p .gpu_data && cp ../shared/data/{tinyshakespeare.txt,llama2_tokenizer.model,tok512.model,hellaswag_val_head10.jsonl} .gpu_data/
#   bash bench/gpu_check.sh [.gpu_data]          # log and table go to $OUT (a temporary folder if unset)
#   DRY_RUN=1 bash bench/gpu_check.sh .gpu_data  # the same commands on the CPU at toy sizes, to rehearse
#   ONLY="train_eager_64 train_compiled_64" bash bench/gpu_check.sh .gpu_data  # just these parts (a rerun)
#
# In order of importance:
# 1. generation: greedy new tokens/s at batch 1 and 4 (left-padded prompts of different lengths), 200 new
#    tokens, bf16, CUDA graph vs eager vs transformers; the graph's tokens equal eager decoding's
# 2. HellaSwag scoring time over 10,042 examples (the 10 real ones repeated)
# 3. training throughput of mini-llama-109M, 32 x 1024, bf16, eager and compiled (+ a profile of the top kernels)
# 4. a short real training run (tiny shakespeare, Llama 2 tokenizer, mini-llama-109M, torch.compile, bf16) with
#    val loss, HellaSwag and samples inside the loop, a checkpoint, and a resumed second half
# 5. sampling from that run with the CLI (streaming, and --interactive reusing the captured graph)
# 6. training throughput at 64 x 1024, eager and compiled
# 7. Muon's optimizer step beside AdamW's on mini-llama-109M (issue 15; past the budget of a full run: run it with ONLY)
# 8. FSDP2 and activation checkpointing: peak memory vs the README's estimate, a sharded run resumed, sampled
#    (issue 17; ONLY="prepare fsdp_train_32 ac_full_train_32 fsdp_run_first_half fsdp_run_resumed fsdp_generate")
# 9. the server on the inference engine (continuous batching, CUDA-graph decode over 32 rows): tokens/s and
#    p50/p99 at 1, 8 and 32 clients, and head-of-line blocking (issue 24; ONLY=serve)
# 10. batch.micro_batch = auto: the plan (--dry-run) and a 2-step run of 512 sequences per step, its pick (after the
#    CUDA probe) and its peak memory beside the estimate (issue 30; ONLY="prepare auto_plan auto_run")
# 11. the speedrun recipe beside the AdamW and Muon recipes on the same short run: speed and val loss (issue 28;
#    ONLY="prepare recipe_adamw recipe_muon recipe_speedrun")
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=${1:-.gpu_data}
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ ${DRY_RUN:-0} == 1 ]]; then
    DEVICE=cpu SEQ=64 MICRO=2 BIG_MICRO=4 HALF_STEPS=4 NEW_TOKENS=8 EXAMPLES=16 BUDGET=1200 COMPILE=false PRESET=tiny AUTO_SEQUENCES=8 \
        AB_STEPS=20
else
    DEVICE=cuda SEQ=1024 MICRO=32 BIG_MICRO=64 HALF_STEPS=20 NEW_TOKENS=200 EXAMPLES=10042 BUDGET=290 COMPILE=auto PRESET=mini-llama-109M \
        AUTO_SEQUENCES=512 AB_STEPS=60
fi
NO_COMPILE=$([[ $COMPILE == false ]] && echo --no-compile)
DEADLINE=$((SECONDS + BUDGET))

part() {  # part NAME SECONDS COMMAND...: run with a time limit; a failure is reported as a JSON line, not fatal
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((DEADLINE - SECONDS))
    if (( left < limit )); then limit=$left; fi
    if (( limit < 10 )); then
        echo "{\"part\": \"$name\", \"skipped\": \"no time left in the ${BUDGET}-second budget\"}"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "{\"part\": \"$name\", \"exit_code\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}"
}

summarize_run() {  # summarize_run RUN_DIR NAME: one JSON line about a training run
python - "$1" "$2" <<'PY'
import json, statistics, sys
from pathlib import Path
if not Path(sys.argv[1]).exists():
    sys.exit()  # its parts did not run (ONLY, or the budget); they say so themselves
path = Path(sys.argv[1]) / "metrics.jsonl"
if not path.is_file():
    print(json.dumps({"check": "train_run", "name": sys.argv[2], "error": "the run left no metrics; see its log above"}))
    sys.exit()
records = [json.loads(line) for line in path.read_text().splitlines()]
train = [r for r in records if r["kind"] == "train"]
evals = [r for r in records if r["kind"] == "eval"]
samples = [r for r in records if r["kind"] == "samples"]
print(json.dumps({"check": "train_run", "name": sys.argv[2], "steps": len(train), "contiguous": [r["step"] for r in train] == list(range(len(train))),
                  "first_loss": round(train[0]["loss"], 4), "last_loss": round(train[-1]["loss"], 4),
                  "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train)),
                  "median_mfu": round(statistics.median(r.get("mfu", 0) for r in train), 4),
                  "eval_steps": [r["step"] for r in evals], "val_loss": [round(r["val_loss"], 4) for r in evals],
                  "hellaswag": [r.get("hellaswag_acc_norm") for r in evals],
                  "checkpoints": sorted(p.name for p in (Path(sys.argv[1]) / "checkpoints").glob("step_*")),
                  "micro_batch": next((r.get("micro_batch") for r in records if r["kind"] == "run"), None),
                  "micro_batch_estimate_gib": next((round(r["micro_batch_estimate_bytes"] / 2**30, 2) for r in records
                                                   if r["kind"] == "run" and "micro_batch_estimate_bytes" in r), None),
                  "peak_memory_gib": max((round(r["peak_memory_bytes"] / 2**30, 2) for r in train if "peak_memory_bytes" in r), default=None),
                  "last_samples": samples[-1]["samples"][:2] if samples else None}))
PY
}

checks() {
python - "$DEVICE" <<'PY'
import json, sys, torch
cuda = sys.argv[1] == "cuda"
print(json.dumps({"check": "device", "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                  "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported() if cuda else None}))
PY

part generate 60 python bench/generate_throughput.py --device "$DEVICE" --batch 1 4 --new-tokens "$NEW_TOKENS" --skip-uncached \
    --transformers-batch 4
part hellaswag 45 python bench/hellaswag_throughput.py --device "$DEVICE" --data "$DATA/hellaswag_val_head10.jsonl" \
    --tokenizer "$DATA/llama2_tokenizer.model" --examples "$EXAMPLES" --batch-size 64 --skip-single
part train_eager_32 40 python bench/train_throughput.py --device "$DEVICE" --batch "$MICRO" --seq "$SEQ" --steps 10 --warmup 2 --no-compile
# Same shapes as the training run below, so that its compilation finds these kernels in inductor's cache.
part train_compiled_32 100 python bench/train_throughput.py --device "$DEVICE" --batch "$MICRO" --seq "$SEQ" --steps 20 --warmup 3 \
    $NO_COMPILE --profile

# Validation: 2 micro-batches of whole windows (the prepared split holds one window more than the eval reads).
VAL_TOKENS=$((2 * MICRO * SEQ))
part prepare 30 python -m minillama prepare text "$DATA/tinyshakespeare.txt" --out "$WORK/data" \
    --tokenizer "$DATA/llama2_tokenizer.model" --split-paragraphs --val-tokens $((VAL_TOKENS + SEQ + 1)) \
    --shard-tokens 1000000 --workers 4 --quiet
RUN=$WORK/run
# The same run both times: the second resumes from the first's checkpoint and goes on to the end.
SHORT_RUN=(--set device="$DEVICE" --set compile="$COMPILE"
    --set run_dir="$RUN" --set data.dir="$WORK/data" --set data.tokenizer="$DATA/llama2_tokenizer.model"
    --set batch.seq_len="$SEQ" --set batch.micro_batch="$MICRO" --set batch.total_tokens=$((2 * MICRO * SEQ))
    --set optim.max_steps=$((2 * HALF_STEPS)) --set optim.warmup_steps=$((HALF_STEPS / 4 + 1)) --set eval.interval=$((HALF_STEPS / 2))
    --set eval.val_tokens=$VAL_TOKENS --set eval.hellaswag_file="$DATA/hellaswag_val_head10.jsonl"
    --set checkpoint.interval="$HALF_STEPS")
TRAIN=(python -m minillama train --config configs/mini-llama-109M.toml "${SHORT_RUN[@]}")
part train_run_first_half 90 "${TRAIN[@]}" --set stop_at_step="$HALF_STEPS"
part train_run_resumed 60 "${TRAIN[@]}"
summarize_run "$RUN" "short training run (compiled, 2 halves, the second resumed)"
part generate_cli 30 python -m minillama generate "$RUN" "To stay healthy, I have to" --device "$DEVICE" \
    --num-samples 1 --max-new-tokens 30 --seed 0
printf 'To stay healthy, I have to\nHello, I am a language model,\n' > "$WORK/prompts.txt"
part generate_interactive 30 python -m minillama generate "$RUN" --device "$DEVICE" --interactive --num-samples 4 \
    --max-new-tokens 20 --temperature 0 < "$WORK/prompts.txt"
part generate_trained 30 python bench/generate_throughput.py --device "$DEVICE" --checkpoint "$RUN" --batch 4 \
    --new-tokens "$NEW_TOKENS" --skip-uncached --transformers-batch

part train_eager_64 40 python bench/train_throughput.py --device "$DEVICE" --batch "$BIG_MICRO" --seq "$SEQ" --steps 10 --warmup 2 --no-compile
part train_compiled_64 100 python bench/train_throughput.py --device "$DEVICE" --batch "$BIG_MICRO" --seq "$SEQ" --steps 20 --warmup 3 $NO_COMPILE
part muon 40 python bench/muon_overhead.py --device "$DEVICE" --preset "$PRESET" --micro-batch "$MICRO" --repeats 3

# FSDP2 and activation checkpointing on one GPU (issue 17; past the budget of a full run: run them with ONLY, see the
# README): peak memory beside minillama.train.memory's estimate, and a short sharded run that resumes.
part fsdp_train_32 100 python bench/train_throughput.py --device "$DEVICE" --batch "$MICRO" --seq "$SEQ" --steps 10 --warmup 3 \
    --parallel fsdp $NO_COMPILE
part ac_full_train_32 100 python bench/train_throughput.py --device "$DEVICE" --batch "$MICRO" --seq "$SEQ" --steps 10 --warmup 3 \
    --activation-checkpointing full $NO_COMPILE
FSDP_TRAIN=("${TRAIN[@]}" --set run_dir="$WORK/fsdp_run" --set parallel=fsdp --set activation_checkpointing=selective)
part fsdp_run_first_half 90 "${FSDP_TRAIN[@]}" --set stop_at_step="$HALF_STEPS"
part fsdp_run_resumed 60 "${FSDP_TRAIN[@]}"
summarize_run "$WORK/fsdp_run" "short fsdp run (selective checkpointing, sharded checkpoints, resumed)"
part fsdp_generate 30 python -m minillama generate "$WORK/fsdp_run" "To stay healthy, I have to" --device "$DEVICE" \
    --num-samples 1 --max-new-tokens 30 --seed 0

# The server on the inference engine (issue 24): 32 requests of 8..256 new tokens at 1, 8 and 32 clients, head of line.
part serve 90 env MINILLAMA_TEST_DATA="$DATA" python bench/serve_load.py --presets "$PRESET" --device "$DEVICE" --requests 32

# batch.micro_batch = auto (issue 30): what the estimate picks for this GPU's free memory, then a real run that tries it.
AUTO=("${TRAIN[@]}" --set run_dir="$WORK/auto_run" --set batch.micro_batch=auto --set batch.total_tokens=$((AUTO_SEQUENCES * SEQ))
    --set optim.max_steps=2 --set optim.warmup_steps=1 --set eval.interval=1000 --set eval.num_samples=0 --set eval.hellaswag=false
    --set checkpoint.interval=1000)
part auto_plan 30 "${AUTO[@]}" --dry-run
part auto_run 150 "${AUTO[@]}"
summarize_run "$WORK/auto_run" "micro_batch = auto ($AUTO_SEQUENCES sequences per step)"

# The speedrun recipe beside the reference (AdamW) and Muon recipes (issue 28), each on the same short run: tiny
# shakespeare, AB_STEPS steps of the short run's batch, the recipe's own schedule lengths scaled to the run. It shows
# each recipe compiled on CUDA, its speed, and the val losses after the same steps; tiny shakespeare is far too small
# to say whether the small-scale gains hold at 109M (docs/benchmarks.md names the run that would).
# Past the budget of a full run: ONLY="prepare recipe_adamw recipe_muon recipe_speedrun".
AB=(--set optim.max_steps="$AB_STEPS" --set optim.warmup_steps=$((AB_STEPS / 15 + 1)) --set eval.interval=$((AB_STEPS / 4))
    --set eval.hellaswag=false --set eval.num_samples=0 --set checkpoint.interval=1000)
SPEEDRUN_SCALED=(--set optim.muon_momentum_cooldown_steps=$((AB_STEPS / 10))
    --set "batch.stages=[[$((AB_STEPS / 2)), $((MICRO * SEQ))]]")  # half the batch for the first half (two micro-batches: no quarter)
for recipe in adamw:mini-llama-109M muon:mini-llama-109M-muon speedrun:mini-llama-109M-speedrun; do
    name=${recipe%%:*}
    extra=()
    if [[ $name == speedrun ]]; then extra=("${SPEEDRUN_SCALED[@]}"); fi
    part "recipe_$name" 100 python -m minillama train --config "configs/${recipe#*:}.toml" "${SHORT_RUN[@]}" "${AB[@]}" "${extra[@]}" \
        --set run_dir="$WORK/recipe_$name"
    summarize_run "$WORK/recipe_$name" "recipe A/B: $name ($AB_STEPS steps of $((2 * MICRO * SEQ)) tokens)"
done
}

checks 2>&1 | tee "$OUT/gpu_check.log"
python bench/gpu_report.py "$OUT/gpu_check.log" | tee "$OUT/gpu_check.md"
