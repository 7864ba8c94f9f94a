#!/usr/bin/env bash
# Writes models/llada-tiny-kjv/card.json: the figures tests/shipped_model.rs checks the shipped
# model against (held-out bound on 8 windows, three greedy generations). Run after an export.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=models/llada-tiny-kjv
LLADA=${LLADA:-target/release/llada}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

$LLADA ppl "$OUT" "$OUT/heldout.txt" --context 256 --mc-num 64 --batch 16 --seed 0 \
  --max-windows 8 --json > "$TMP/ppl.json"
gen() { # name, chat(0/1), prompt
  local chat=()
  if [ "$2" = 1 ]; then chat=(--chat); fi
  $LLADA generate "$OUT" "${chat[@]}" --prompt "$3" --gen-length 32 --steps 32 --block-length 32 \
    --seed 0 --json > "$TMP/$1.json"
}
gen g1 0 "The LORD is my shepherd"
gen g2 1 "Abel lives in Bethel and keeps 7 sheep. What does Abel keep?"
gen g3 1 "Reverse the list: apple, river, stone."

python3 - "$TMP" "$OUT/card.json" <<'PY'
import json, sys
tmp, out = sys.argv[1], sys.argv[2]
ppl = json.load(open(f"{tmp}/ppl.json"))
prompts = [("g1", False, "The LORD is my shepherd"),
           ("g2", True, "Abel lives in Bethel and keeps 7 sheep. What does Abel keep?"),
           ("g3", True, "Reverse the list: apple, river, stone.")]
card = {
    "heldout_bound": {"file": "heldout.txt", "context": 256, "mc_num": 64, "batch": 16,
                      "seed": 0, "max_windows": 8, "tokens": ppl["tokens"],
                      "nll_per_token": ppl["nll_per_token"], "stderr": ppl["stderr"]},
    "greedy": [{"prompt": p, "chat": c, "gen_length": 32, "steps": 32, "block_length": 32,
                "text": json.load(open(f"{tmp}/{n}.json"))["text"]} for n, c, p in prompts],
}
json.dump(card, open(out, "w"), indent=2)
open(out, "a").write("\n")
PY
echo "wrote $OUT/card.json"
