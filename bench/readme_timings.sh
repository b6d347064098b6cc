#!/usr/bin/env bash
# Times the README's two set-up commands as a new user runs them (the package already installed): the main job
# (training the tiny preset on tiny shakespeare, in a fresh folder) and the test command. Run on idle cores.
#
#   bash bench/readme_timings.sh [PATH/TO/tinyshakespeare.txt]     (default ../shared/data/tinyshakespeare.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TEXT=$(realpath "${1:-../shared/data/tinyshakespeare.txt}")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "cores: $(nproc), torch threads: $(python -c 'import torch; print(torch.get_num_threads())')"

start=$SECONDS
(cd "$WORK" && minillama train --config "$REPO/configs/tiny.toml" --set "data.files=[\"$TEXT\"]" > train.log 2>&1)
train_s=$((SECONDS - start))
grep -E "val loss|finished" "$WORK/train.log" | tail -3
grep -A1 "sample 0" "$WORK/train.log" | tail -2
echo "{\"bench\": \"readme\", \"command\": \"main job (tiny preset, tiny shakespeare)\", \"seconds\": $train_s}"

start=$SECONDS
python -m pytest -q -p no:cacheprovider > "$WORK/tests.log" 2>&1 || true
tests_s=$((SECONDS - start))
tail -1 "$WORK/tests.log"
echo "{\"bench\": \"readme\", \"command\": \"python -m pytest -q (MINILLAMA_TEST_DATA=${MINILLAMA_TEST_DATA:-unset})\", \"seconds\": $tests_s}"
