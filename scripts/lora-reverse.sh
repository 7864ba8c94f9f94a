#!/usr/bin/env bash
# LoRA SFT of the shipped model on one synthetic task it fails (list reversal): held-out exact
# match before and after, and the run's time. Usage (from the repository root):
#
#   scripts/lora-reverse.sh [WORK_DIR]        (env: STEPS, RANK, BATCH, LR, THREADS, PRECISION, EXTRA)
#
# Training and test examples come from different seeds of `llada data synth-sft`; test prompts
# that also occur in the training set are dropped, so the test set is held out.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/lora-reverse}
STEPS=${STEPS:-300}
RANK=${RANK:-16}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-f32}
BATCH=${BATCH:-16}
LR=${LR:-2e-3}
MODEL=models/llada-tiny-kjv
LLADA=${LLADA:-target/release/llada}
mkdir -p "$WORK"

# reverse examples only: training from seed 21, test from seed 22 (unseen prompts)
$LLADA data synth-sft --n 12000 --seed 21 --out "$WORK/all-train.jsonl" >/dev/null
$LLADA data synth-sft --n 3000 --seed 22 --out "$WORK/all-test.jsonl" >/dev/null
grep '"task":"reverse"' "$WORK/all-train.jsonl" > "$WORK/train.jsonl"
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
seen = {json.loads(l)["messages"][0]["content"] for l in open(f"{w}/train.jsonl")}
test = [l for l in open(f"{w}/all-test.jsonl") if '"task":"reverse"' in l
        and json.loads(l)["messages"][0]["content"] not in seen][:200]
open(f"{w}/test.jsonl", "w").writelines(test)
print(f"{len(seen)} training prompts, {len(test)} held-out test prompts")
PY
$LLADA data prepare --tokenizer "$MODEL" --kind sft --val-fraction 0.02 --seed 0 --max-len 128 \
  --out "$WORK/data" "$WORK/train.jsonl" >/dev/null

EVAL=(--gen-length 32 --steps 32 --block-length 32 --batch 16 --threads "$THREADS")
echo "== before"
$LLADA eval-chat "$MODEL" "$WORK/test.jsonl" "${EVAL[@]}" | tee "$WORK/before.txt"

echo "== LoRA SFT: rank $RANK, all targets, $STEPS steps, precision $PRECISION"
START=$(date +%s.%N)
$LLADA train --mode sft --init-from "$MODEL" --data "$WORK/data" --out "$WORK/run" --force \
  --lora-rank "$RANK" --steps "$STEPS" --seq-len 128 --batch-size "$BATCH" --lr "$LR" \
  --eval-every 100 --save-every "$STEPS" --log-every 50 --precision "$PRECISION" \
  --threads "$THREADS" ${EXTRA:-}
END=$(date +%s.%N)
python3 -c "print(f'training time {float($END) - float($START):.1f} s')" | tee "$WORK/time.txt"

echo "== after (the base model with the adapter)"
$LLADA eval-chat "$MODEL" "$WORK/test.jsonl" --adapter "$WORK/run" "${EVAL[@]}" | tee "$WORK/after.txt"
