#!/usr/bin/env bash
# VRPO on the shipped model against SFT on the chosen answers, on its QA task. Usage (from the
# repository root):
#
#   scripts/vrpo-qa.sh [WORK_DIR]   (env: PROMPTS, STEPS, BATCH, LR, BETA, NT, NYT, SFT_WEIGHT,
#                                    RANK, SAVE_EVERY, THREADS)
#
# The README's rows: BETA=0.1 SFT_WEIGHT=0; BETA=0.5 LR=5e-4 SFT_WEIGHT=0 SAVE_EVERY=75 (step 75
# evaluated with `llada eval-chat … --adapter RUN/checkpoints/step-0000075`); the defaults.
#
# 1. QA prompts from `llada data synth-sft` (training seed 31, test seed 32; test prompts that
#    also occur in training are dropped).
# 2. The shipped model answers the training prompts (greedy, the evaluation's sampler). Each
#    wrong answer makes a pair: chosen = the correct answer, rejected = the model's own answer.
# 3. Two LoRA runs with the same pairs, steps, batch, rank and learning rate: VRPO on the pairs,
#    and SFT on the chosen answers alone.
# 4. Exact match on the held-out prompts before and after each, with 95% Wilson intervals.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/vrpo}
PROMPTS=${PROMPTS:-800}
STEPS=${STEPS:-150}
BATCH=${BATCH:-8}
LR=${LR:-2e-3}
BETA=${BETA:-0.5}
SFT_WEIGHT=${SFT_WEIGHT:-1}
NT=${NT:-4}
NYT=${NYT:-1}
RANK=${RANK:-16}
SAVE_EVERY=${SAVE_EVERY:-$STEPS}
THREADS=${THREADS:-2}
MODEL=models/llada-tiny-kjv
LLADA=${LLADA:-target/release/llada}
EVAL=(--gen-length 32 --steps 32 --block-length 32 --batch 16 --threads "$THREADS")
mkdir -p "$WORK"

if [ ! -f "$WORK/test.jsonl" ]; then
  $LLADA data synth-sft --n 6000 --seed 31 --out "$WORK/all-train.jsonl" >/dev/null
  $LLADA data synth-sft --n 3000 --seed 32 --out "$WORK/all-test.jsonl" >/dev/null
  python3 - "$WORK" "$PROMPTS" <<'PY'
import json, sys
w, n = sys.argv[1], int(sys.argv[2])
train = [l for l in open(f"{w}/all-train.jsonl") if '"task":"qa"' in l][:n]
seen = {json.loads(l)["messages"][0]["content"] for l in train}
test = [l for l in open(f"{w}/all-test.jsonl") if '"task":"qa"' in l
        and json.loads(l)["messages"][0]["content"] not in seen][:300]
open(f"{w}/train-prompts.jsonl", "w").writelines(train)
open(f"{w}/test.jsonl", "w").writelines(test)
print(f"{len(train)} training prompts, {len(test)} held-out test prompts")
PY
fi

if [ ! -f "$WORK/pairs.jsonl" ]; then
  echo "== the model's own answers to the training prompts"
  $LLADA eval-chat "$MODEL" "$WORK/train-prompts.jsonl" "${EVAL[@]}" --json > "$WORK/train-samples.json"
  python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
res = json.load(open(f"{w}/train-samples.json"))
cases = [json.loads(l) for l in open(f"{w}/train-prompts.jsonl")]
rows = res["results"] if isinstance(res, dict) and "results" in res else res
pairs, sft = [], []
for case, r in zip(cases, rows):
    prompt = case["messages"][0]["content"]
    want = case["messages"][-1]["content"].strip()
    got = r["answer"].strip()
    # a right answer makes no pair; nor does an empty one (a pair needs two answers)
    if r.get("correct") or got == want or not got:
        continue
    pairs.append({"prompt": prompt, "chosen": want, "rejected": got})
    sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": want}]})
with open(f"{w}/pairs.jsonl", "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
with open(f"{w}/chosen.jsonl", "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in sft)
print(f"{len(pairs)} pairs from {len(cases)} prompts (the model answered the rest right)")
PY
fi

# the same split for both: the held-out pairs / chosen answers come from the same records
$LLADA data prepare --tokenizer "$MODEL" --kind preference --val-fraction 0.05 --seed 0 \
  --max-len 128 --out "$WORK/data-pairs" "$WORK/pairs.jsonl" >/dev/null
$LLADA data prepare --tokenizer "$MODEL" --kind sft --val-fraction 0.05 --seed 0 \
  --max-len 128 --out "$WORK/data-chosen" "$WORK/chosen.jsonl" >/dev/null

if [ ! -f "$WORK/before.txt" ]; then
  echo "== before"
  $LLADA eval-chat "$MODEL" "$WORK/test.jsonl" "${EVAL[@]}" | tee "$WORK/before.txt"
fi

COMMON=(--init-from "$MODEL" --lora-rank "$RANK" --steps "$STEPS" --seq-len 128
  --batch-size "$BATCH" --lr "$LR" --eval-every 15 --save-every "$SAVE_EVERY" --log-every 10
  --threads "$THREADS" --force)

VRPO_RUN="$WORK/run-vrpo-b$BETA-lr$LR-sft$SFT_WEIGHT"
echo "== VRPO: β $BETA, budget ${NT}×${NYT}, SFT term λ $SFT_WEIGHT, LoRA rank $RANK, $STEPS steps of $BATCH pairs"
START=$(date +%s.%N)
/usr/bin/time -f '%M' -o "$WORK/rss-vrpo.txt" \
  $LLADA train --mode vrpo --data "$WORK/data-pairs" --out "$VRPO_RUN" "${COMMON[@]}" \
  --beta "$BETA" --vrpo-timesteps "$NT" --vrpo-masks "$NYT" --vrpo-sft-weight "$SFT_WEIGHT"
END=$(date +%s.%N)
echo "VRPO training time $(python3 -c "print(round($END - $START, 1))") s, peak RSS $(tail -1 "$WORK/rss-vrpo.txt") KB" | tee "$WORK/time-vrpo.txt"

echo "== SFT on the chosen answers: LoRA rank $RANK, $STEPS steps of $BATCH examples"
START=$(date +%s.%N)
/usr/bin/time -f '%M' -o "$WORK/rss-sft.txt" \
  $LLADA train --mode sft --data "$WORK/data-chosen" --out "$WORK/run-sft" "${COMMON[@]}"
END=$(date +%s.%N)
echo "SFT training time $(python3 -c "print(round($END - $START, 1))") s, peak RSS $(tail -1 "$WORK/rss-sft.txt") KB" | tee "$WORK/time-sft.txt"

$LLADA plot "$VRPO_RUN"
for r in "$VRPO_RUN" "$WORK/run-sft"; do
  echo "== after $r"
  $LLADA eval-chat "$MODEL" "$WORK/test.jsonl" --adapter "$r" "${EVAL[@]}" | tee "$r.after.txt"
done
