#!/usr/bin/env bash
# Everything GPU-specific in one go, printing JSON lines; never more than 5 minutes (each part has a time limit,
# and parts that no longer fit in 290 s are skipped and reported as such).
# Needs PyTorch with CUDA, transformers, sentencepiece, safetensors, numpy, tqdm, matplotlib; no network, no `datasets`.
#
#   mkdir -p .gpu_data && cp ../shared/data/{tinyshakespeare.txt,llama2_tokenizer.model,hellaswag_val_head10.jsonl} .gpu_data/
#   bash bench/gpu_check.sh [.gpu_data]
#
# 1. training throughput of mini-llama-109M at 32 x 1024, bf16, eager and compiled
# 2. a short real training run (tiny shakespeare, Llama 2 tokenizer, mini-llama-109M, torch.compile on) with
#    validation loss, HellaSwag and sampling at each evaluation
# 3. generation: new tokens/s at batch 1 and 4, 200 new tokens, CUDA graph vs eager vs transformers, same tokens
# 4. HellaSwag scoring speed over 10,042 examples (the 10 real ones repeated)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=${1:-.gpu_data}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

DEADLINE=$((SECONDS + 290))
part() {  # part NAME SECONDS COMMAND...: run with a time limit; a failure is reported as a JSON line, not fatal
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if (( left < limit )); then limit=$left; fi
    if (( limit < 10 )); then
        echo "{\"part\": \"$name\", \"skipped\": \"no time left in the 5-minute budget\"}"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "{\"part\": \"$name\", \"exit_code\": $rc, \"seconds\": $((SECONDS - start))}"
}

python - <<'PY'
import json, torch
print(json.dumps({"check": "device", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}))
PY

part train_throughput_eager 35 python bench/train_throughput.py --batch 32 --seq 1024 --steps 10 --warmup 2 --no-compile
# Same shapes as the training run below, so its compilation finds these kernels in inductor's cache.
part train_throughput_compiled 100 python bench/train_throughput.py --batch 32 --seq 1024 --steps 20 --warmup 3

part prepare 20 python -m minillama prepare text "$DATA/tinyshakespeare.txt" --out "$WORK/data" --tokenizer "$DATA/llama2_tokenizer.model" \
    --split-paragraphs --val-tokens 65536 --shard-tokens 1000000 --quiet
part train_run 100 python -m minillama train --config configs/mini-llama-109M.toml \
    --set run_dir="$WORK/run" --set data.dir="$WORK/data" --set data.tokenizer="$DATA/llama2_tokenizer.model" \
    --set batch.total_tokens=65536 --set batch.micro_batch=32 --set optim.max_steps=30 --set optim.warmup_steps=5 \
    --set eval.interval=15 --set eval.val_tokens=65536 --set eval.hellaswag_file="$DATA/hellaswag_val_head10.jsonl" \
    --set checkpoint.interval=30 > "$WORK/train.log" 2>&1
tail -5 "$WORK/train.log"
python - "$WORK/run" <<'PY'
import json, statistics, sys
from pathlib import Path
records = [json.loads(l) for l in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
train = [r for r in records if r["kind"] == "train"]
evals = [r for r in records if r["kind"] == "eval"]
samples = [r for r in records if r["kind"] == "samples"]
print(json.dumps({"check": "train_run", "steps": len(train), "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
                  "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train[5:])),
                  "median_mfu": round(statistics.median(r.get("mfu", 0) for r in train[5:]), 4),
                  "val_loss": [round(r["val_loss"], 4) for r in evals], "hellaswag": [r.get("hellaswag_acc_norm") for r in evals],
                  "samples": samples[-1]["samples"][:2] if samples else None}))
PY
[ $? -eq 0 ] || echo '{"check": "train_run", "error": "the run left no readable metrics; see the log tail above"}'
part generate_cli 30 python -m minillama generate "$WORK/run" "To stay healthy, I have to" --num-samples 1 --max-new-tokens 30 --seed 0

part generate_throughput 60 python bench/generate_throughput.py --batch 1 4 --new-tokens 200 --skip-uncached
part hellaswag_throughput 45 python bench/hellaswag_throughput.py --data "$DATA/hellaswag_val_head10.jsonl" \
    --tokenizer "$DATA/llama2_tokenizer.model" --examples 10042 --batch-size 64 --skip-single
