#!/usr/bin/env bash
# Measures llada next to the PyTorch peer (../shared/peer/llada_torch.py) in one run, on this
# machine, with the same checkpoints and settings, and writes every figure as JSON lines into
# out/bench/. Usage: scripts/bench-vs-peer.sh [PEER_PYTHON]   (default /opt/llada-peer/bin/python;
# make it with: python3 -m venv /opt/llada-peer && /opt/llada-peer/bin/pip install torch safetensors tokenizers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-/opt/llada-peer/bin/python}
PEER=${PEER:-../shared/peer}
T=${THREADS:-2}
OUT=out/bench
M135=${M135:-out/bench/bench-135m}
mkdir -p "$OUT"
cargo build --release
L=target/release/llada
[ -f "$M135/config.json" ] || $L init --config benches/configs/bench-135m.json --out "$M135" --seed 0
log() { echo "$1" | tee -a "$OUT/all.jsonl"; }

echo "== generation: 135M, prompt 64, gen 128, steps 128, block 32, $T threads"
for dt in f32 bf16; do
  pdt=$([ $dt = f32 ] && echo float32 || echo bfloat16)
  log "$($PY $PEER/llada_torch.py bench --model "$M135" --prompt-len 64 --gen-length 128 --steps 128 --block-length 32 --threads $T --dtype $pdt --repeat 1)"
  log "$($L bench "$M135" --prompt-len 64 --gen-length 128 --steps 128 --block-length 32 --threads $T --dtype $dt --warmup 1 --runs 2 --json)"
done

echo "== forward: 135M, batch 1 x 192 tokens, f32"
log "$($L bench "$M135" --mode forward --len 192 --threads $T --runs 5 --json)"
log "$($PY - "$M135" "$PEER" "$T" <<'EOF'
import json, sys, time, torch
sys.path.insert(0, sys.argv[2]); import llada_torch as L
torch.set_num_threads(int(sys.argv[3]))
m = L.load(sys.argv[1], torch.float32); x = torch.randint(0, 30000, (1, 192))
with torch.no_grad():
    m(x); ts = []
    for _ in range(5):
        t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
print(json.dumps({"impl": "peer forward", "len": 192, "ms": 1e3 * sorted(ts)[2]}))
EOF
)"

echo "== scoring: 135M, prompt 64, answer 32, mc_num 128, batch 16"
log "$($PY scripts/peer_bench_score.py --model "$M135" --peer "$PEER" --threads $T --repeat 1)"
log "$($L bench "$M135" --mode score --threads $T --runs 1 --warmup 1 --json)"

echo "== training: 135M, batch 8 x 256, f32"
log "$($PY $PEER/llada_torch.py train-bench --model "$M135" --batch 8 --seq-len 256 --steps 3 --threads $T)"
log "$($L bench "$M135" --mode train --batch 8 --len 256 --runs 3 --warmup 1 --threads $T --json)"

echo "== caches: 135M, prompt 64, gen 256, steps 256, block 32, f32"
for c in none dual prefix; do
  log "$($L bench "$M135" --prompt-len 64 --gen-length 256 --steps 256 --block-length 32 --cache $c --threads $T --warmup 0 --runs 1 --json)"
done

echo "== shipped model: reference sampler vs dual cache + threshold 0.9 (gen 64, block 32)"
S=models/llada-tiny-kjv
log "$($PY $PEER/llada_torch.py bench --model "$S" --prompt-len 64 --gen-length 64 --steps 64 --block-length 32 --threads $T --repeat 1)"
log "$($L bench "$S" --prompt-len 64 --gen-length 64 --steps 64 --block-length 32 --threads $T --warmup 1 --runs 3 --json)"
log "$($L bench "$S" --prompt-len 64 --gen-length 64 --block-length 32 --threshold 0.9 --cache dual --threads $T --warmup 1 --runs 3 --json)"
log "$($L bench "$S" --prompt-len 64 --gen-length 64 --block-length 32 --threshold 0.9 --cache dual --early-stop --threads $T --warmup 1 --runs 3 --json)"
echo "figures in $OUT/all.jsonl"

echo "== shipped model on its task test set: plain sampler (steps = gen length) vs dual cache + threshold 0.9, batch 1"
TESTS=${TESTS:-runs/llada-tiny-kjv/sft-test.jsonl}
if [ -f "$TESTS" ]; then
  log "$($L eval-chat "$S" "$TESTS" --limit 200 --batch 1 --gen-length 32 --steps 32 --block-length 32 --threads $T --json | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("results"); d["sampler"]="plain"; print(json.dumps(d))')"
  log "$($L eval-chat "$S" "$TESTS" --limit 200 --batch 1 --gen-length 32 --block-length 32 --threshold 0.9 --cache dual --threads $T --json | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("results"); d["sampler"]="dual+0.9"; print(json.dumps(d))')"
  log "$($L eval-chat "$S" "$TESTS" --limit 200 --batch 1 --gen-length 32 --block-length 32 --threshold 0.9 --cache dual --early-stop --threads $T --json | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("results"); d["sampler"]="dual+0.9+early-stop"; print(json.dumps(d))')"
fi
