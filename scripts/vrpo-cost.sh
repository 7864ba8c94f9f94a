#!/usr/bin/env bash
# The cost of a VRPO step against an SFT step at the same batch, for budgets n = 1, 2, 4, 8
# (n_t = n, n_yt = 1), with the peak memory of each run. Needs the pairs and chosen answers
# that scripts/vrpo-qa.sh prepares. Usage (from the repository root):
#
#   scripts/vrpo-cost.sh [WORK_DIR]      (env: STEPS, BATCH, THREADS, EXTRA)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/vrpo}
STEPS=${STEPS:-6}
BATCH=${BATCH:-8}
THREADS=${THREADS:-2}
MODEL=models/llada-tiny-kjv
LLADA=${LLADA:-target/release/llada}
COMMON=(--init-from "$MODEL" --lora-rank 16 --steps "$STEPS" --seq-len 128 --batch-size "$BATCH"
  --lr 1e-3 --eval-every 0 --save-every 0 --threads "$THREADS" --force --json ${EXTRA:-})

# median seconds per step after the first (tokens / tokens_per_s of each metrics line)
step_time() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"tokens_per_s"' in l]
dts = []
prev = 0
for r in rows:
    dts.append((r["tokens"] - prev) / r["tokens_per_s"])
    prev = r["tokens"]
print(f"{statistics.median(dts[1:]):.3f}")
PY
}

/usr/bin/time -f '%M' -o "$WORK/cost-rss-sft.txt" $LLADA train --mode sft --data "$WORK/data-chosen" \
  --out "$WORK/cost-sft" "${COMMON[@]}" >/dev/null 2>&1
SFT=$(step_time "$WORK/cost-sft")
echo "| run | s/step | × SFT | peak RSS |"
echo "| --- | --- | --- | --- |"
echo "| SFT, LoRA r16, batch $BATCH | $SFT | 1 | $(( $(cat "$WORK/cost-rss-sft.txt") / 1000 )) MB |"
for N in 1 2 4 8; do
  /usr/bin/time -f '%M' -o "$WORK/cost-rss-$N.txt" $LLADA train --mode vrpo --data "$WORK/data-pairs" \
    --out "$WORK/cost-vrpo-$N" --vrpo-timesteps "$N" "${COMMON[@]}" >/dev/null 2>&1
  T=$(step_time "$WORK/cost-vrpo-$N")
  echo "| VRPO n = $N × 1, LoRA r16, batch $BATCH pairs | $T | $(python3 -c "print(f'{$T / $SFT:.1f}')") | $(( $(cat "$WORK/cost-rss-$N.txt") / 1000 )) MB |"
done
