#!/usr/bin/env bash
# Dream-7B's forward and cached-step cost next to LLaDA-8B's, in one run on this machine: random
# bf16 checkpoints of the real shapes (benches/configs/dream-7b.json, llada-8b.json), $THREADS
# threads (default 2), as scripts/bench-moe.sh measures them; then the same Dream forward in eager
# PyTorch (benches/peer/dream_forward.py: the speed peer's blocks plus Qwen2's biases) when
# $PEER_PYTHON (default /opt/llada-peer/bin/python) has torch. JSON lines go to
# out/bench/dream.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
JSONL=dream.jsonl scripts/bench-moe.sh dream-7b llada-8b
PY=${PEER_PYTHON:-/opt/llada-peer/bin/python}
PEER=${PEER_DIR:-../shared/peer}
if "$PY" -c "import torch" 2>/dev/null && [ -f "$PEER/llada_torch.py" ]; then
  echo "== peer: dream-7b forward (eager PyTorch)"
  "$PY" benches/peer/dream_forward.py --peer "$PEER" --model out/bench/dream-7b-bf16 --len 96 \
    --threads "${THREADS:-2}" --dtype bfloat16 --runs "${RUNS:-3}" | tee -a out/bench/dream.jsonl
fi
