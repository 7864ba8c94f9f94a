#!/usr/bin/env bash
# The same full SFT run of the shipped model in f32 and in bf16 mixed precision (same data,
# seed and batches): the two loss curves on one chart, the losses side by side, the time.
# Usage (from the repository root): scripts/train-bf16-curve.sh [WORK_DIR]
#   env: STEPS (100), THREADS (2), DATA (default: the list-reversal set of scripts/lora-reverse.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/bf16-curve}
STEPS=${STEPS:-100}
THREADS=${THREADS:-2}
LLADA=${LLADA:-target/release/llada}
DATA=${DATA:-runs/lora-reverse/data}
mkdir -p "$WORK"
for p in f32 bf16; do
  START=$(date +%s.%N)
  $LLADA train --mode sft --init-from models/llada-tiny-kjv --data "$DATA" --out "$WORK/$p" \
    --force --steps "$STEPS" --batch-size 16 --seq-len 128 --lr 1e-3 --eval-every 20 \
    --save-every 0 --precision "$p" --threads "$THREADS" --json > "$WORK/$p.jsonl" 2>/dev/null
  END=$(date +%s.%N)
  python3 -c "print('$p: {:.1f} s'.format($END - $START))"
done
$LLADA plot "$WORK/f32" --compare "$WORK/bf16" --out "$WORK/f32-vs-bf16.png"
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
rows = {p: [json.loads(l) for l in open(f"{w}/{p}.jsonl") if l.startswith("{")] for p in ("f32", "bf16")}
print("| step | f32 loss | bf16 loss | f32 bound | bf16 bound |")
print("| --- | --- | --- | --- | --- |")
for a, b in zip(rows["f32"], rows["bf16"]):
    if a["step"] % 10 == 0 or a["step"] == 1:
        fb = lambda r: f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
        print(f"| {a['step']} | {a['loss']:.4f} | {b['loss']:.4f} | {fb(a)} | {fb(b)} |")
PY
