#!/usr/bin/env bash
# lm-evaluation-harness through llada against `llada eval` / `llada eval-chat` on the same data,
# with the shipped model: a live server, the real lm-eval (installed from the registry with
# `pip install ./python/llada-lm-eval` into a venv), per-question and per-answer equality, and
# the wall times of both paths. Needs a release build. Output: out/lm-eval/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${PORT:-18751}
BASE=http://127.0.0.1:$PORT
VENV=${VENV:-out/lm-eval/venv}
OUT=out/lm-eval
LLADA=target/release/llada
mkdir -p "$OUT"
rm -rf "$OUT/mc" "$OUT/chat"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
rm -rf python/llada-lm-eval/build
"$VENV/bin/pip" install -q ./python/llada-lm-eval
# the model's arguments: presets, and errors that name what is wrong
"$VENV/bin/python" - <<'PY'
from llada_lm_eval import LladaLM, ServerError
m = LladaLM(preset="arc_challenge", batch_size=1)
assert (m.mc_num, m.cfg, m.batch) == (128, 0.5, 16), (m.mc_num, m.cfg, m.batch)
m = LladaLM(preset="mmlu", cfg=0.25)
assert (m.mc_num, m.cfg, m.batch) == (1, 0.25, 1)
m = LladaLM(preset="gsm8k", threshold="none", cache="none")
assert m.sampler == {"steps": 1024, "block_length": 1024, "threshold": None, "cache": "none"}, m.sampler
assert m.gen_length == 1024
for bad, word in [({"preset": "nope"}, "arc_challenge"), ({"stepz": 3}, "stepz")]:
    try:
        LladaLM(**bad)
        raise SystemExit(f"{bad} was accepted")
    except ValueError as e:
        assert word in str(e), e
try:
    LladaLM(base_url="http://127.0.0.1:9/v1")._score("a", "b")
    raise SystemExit("no server, no error")
except ServerError as e:
    assert "llada serve" in str(e), e
print("model arguments: ok")
PY

. tests/common/serve.sh
start_server "$OUT/server.log" --port "$PORT" --max-batch 8

export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
now() { date +%s.%N; }

# multiple choice: the Monte Carlo bound (8 samples in batches of 4, seed 0)
t0=$(now)
"$VENV/bin/python" -m llada_lm_eval --model llada \
  --model_args "base_url=$BASE/v1,mc_num=8,batch=4,seed=0,concurrency=8" \
  --tasks llada_mc --include_path tests/lm_eval --output_path "$OUT/mc" --log_samples > "$OUT/mc.log" 2>&1 \
  || { cat "$OUT/mc.log"; exit 1; }
t1=$(now)
"$LLADA" eval tests/lm_eval/mc.jsonl --mc-num 8 --batch 4 --seed 0 --json > "$OUT/mc-llada.json"
t2=$(now)
"$VENV/bin/python" tests/lm_eval/compare.py mc "$OUT/mc" "$OUT/mc-llada.json"

# generation: the reference sampler, 32 tokens, greedy, through the chat endpoint
t3=$(now)
"$VENV/bin/python" -m llada_lm_eval --model llada \
  --model_args "base_url=$BASE/v1,chat=true,gen_length=32,steps=32,block_length=32,threshold=none,cache=none,early_stop=false,concurrency=8" \
  --tasks llada_chat --include_path tests/lm_eval --output_path "$OUT/chat" --log_samples > "$OUT/chat.log" 2>&1 \
  || { cat "$OUT/chat.log"; exit 1; }
t4=$(now)
# one case at a time: a left-padded batch is exact on the portable path only (the server pads
# only there), so the comparison holds on every CPU
"$LLADA" eval-chat tests/lm_eval/chat.jsonl --batch 1 --json > "$OUT/chat-llada.json"
t5=$(now)
"$VENV/bin/python" tests/lm_eval/compare.py chat "$OUT/chat" "$OUT/chat-llada.json"

python3 - "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" <<'PY'
import sys
t = [float(x) for x in sys.argv[1:]]
print(f"wall time: mc lm-eval via server {t[1]-t[0]:.1f}s, llada eval {t[2]-t[1]:.1f}s; "
      f"chat lm-eval via server {t[4]-t[3]:.1f}s, llada eval-chat {t[5]-t[4]:.1f}s "
      "(lm-eval's own start-up included)")
PY
echo "lm-eval: ok"
