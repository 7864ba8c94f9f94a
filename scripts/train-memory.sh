#!/usr/bin/env bash
# Peak memory and time per step of full SFT, LoRA SFT and LoRA SFT with activation
# checkpointing (f32 and bf16 mixed precision) on the 135M benchmark shape, same data and batch.
# Usage (from the repository root): scripts/train-memory.sh [WORK_DIR]
#   env: STEPS (3), BATCH (8), SEQ (256), THREADS (2), MODE (pretrain: every sequence SEQ tokens
#   long; or sft), DATA (a dataset folder of MODE; default for pretrain: the shipped model's
#   held-out verses, prepared here; for sft: the list-reversal set of scripts/lora-reverse.sh,
#   whose batches are padded to their longest example, about 45 tokens)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/train-memory}
STEPS=${STEPS:-3}
BATCH=${BATCH:-8}
SEQ=${SEQ:-256}
THREADS=${THREADS:-2}
LLADA=${LLADA:-target/release/llada}
MODE=${MODE:-pretrain}
mkdir -p "$WORK"
if [ "$MODE" = pretrain ]; then
  DATA=${DATA:-$WORK/data-pretrain}
  [ -d "$DATA" ] || $LLADA data prepare --tokenizer models/llada-tiny-kjv --kind pretrain \
    --doc-per-line --val-fraction 0.01 --seed 0 --out "$DATA" models/llada-tiny-kjv/heldout.txt >/dev/null
else
  DATA=${DATA:-runs/lora-reverse/data}
fi
[ -d "$WORK/base" ] || $LLADA init --config benches/configs/bench-135m.json \
  --tokenizer models/llada-tiny-kjv --out "$WORK/base" --dtype f32 >/dev/null
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS threads; $MODE, batch ${BATCH}×${SEQ}, $STEPS steps"
printf '%-34s %12s %12s\n' "run" "peak RSS" "s/step"
one() {
  local name=$1; shift
  /usr/bin/time -f '%M' -o "$WORK/$name.rss" $LLADA train --mode "$MODE" --init-from "$WORK/base" \
    --data "$DATA" --out "$WORK/$name" --force --steps "$STEPS" --batch-size "$BATCH" \
    --seq-len "$SEQ" --eval-every 0 --save-every 0 --json --seed 1 --threads "$THREADS" "$@" \
    > "$WORK/$name.jsonl" 2> "$WORK/$name.log"
  # seconds per step after the first (warm)
  local sps
  sps=$(python3 -c "
import json,sys
r=[json.loads(l) for l in open('$WORK/$name.jsonl') if l.startswith('{')]
e=[x['elapsed_seconds'] for x in r]
print(f'{(e[-1]-e[0])/(len(e)-1):.2f}' if len(e)>1 else f'{e[0]:.2f}')")
  printf '%-34s %9.2f GB %12s\n' "$name" "$(echo "$(cat "$WORK/$name.rss") / 1048576" | bc -l)" "$sps"
}
one full-f32
one lora16-f32 --lora-rank 16
one lora16-ckpt-f32 --lora-rank 16 --checkpoint-activations
one full-ckpt-f32 --checkpoint-activations
one full-bf16 --precision bf16
one lora16-bf16 --lora-rank 16 --precision bf16
one lora16-ckpt-bf16 --lora-rank 16 --checkpoint-activations --precision bf16
