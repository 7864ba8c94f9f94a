#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, no internet and no Rust toolchain: runs the golden tests on CUDA
# and the LLaDA-8B-shaped benchmark (random bf16 weights made directly on the GPU), and prints the
# figures next to the reference's (../shared/peer/gpu_anchor.py) measured in the same call.
#
# Build here first (CUDA toolchain: see the README's CUDA section), then carry the binaries:
#   source ../shared/cuda/setup.sh
#   cargo build --release --features cuda --target-dir target-cuda
#   cargo test --release --features cuda --target-dir target-cuda --no-run
#   mkdir -p gpu-bin && cp target-cuda/release/llada gpu-bin/ && \
#     for t in golden_model golden_sampler golden_score; do \
#       cp "$(ls -t target-cuda/release/deps/$t-* | grep -v '\.d$' | head -1)" gpu-bin/$t; done
# and run (carry gpu-bin):  bash scripts/gpu-check.sh gpu-bin
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-gpu-bin}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-/usr/local/cuda-13.0/targets/x86_64-linux/lib}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== golden tests on CUDA (f32; the test binaries run CPU and CUDA)"
for t in golden_model golden_sampler golden_score; do
  timeout 120 "$BIN/$t" --nocapture 2>&1 | tail -20 | tee "$OUT/$t.log"
done

echo "== LLaDA-8B shape, bf16, batch 1, prompt 64, gen 256, steps 256, block 32"
timeout 150 "$BIN/llada" bench --random-weights benches/configs/llada-8b.json --device cuda \
  --prompt-len 64 --gen-length 256 --steps 256 --block-length 32 --warmup 0 --runs 1 --json | tee "$OUT/bench-8b.json"
echo "== same, dual cache + threshold 0.9"
timeout 90 "$BIN/llada" bench --random-weights benches/configs/llada-8b.json --device cuda \
  --prompt-len 64 --gen-length 256 --block-length 32 --threshold 0.9 --cache dual --warmup 0 --runs 1 --json | tee "$OUT/bench-8b-fast.json"
echo "== batch 8"
timeout 90 "$BIN/llada" bench --random-weights benches/configs/llada-8b.json --device cuda \
  --prompt-len 64 --gen-length 256 --steps 256 --block-length 32 --batch 8 --warmup 0 --runs 1 --json | tee "$OUT/bench-8b-b8.json"

echo "== reference (eager PyTorch) on the same GPU"
if python3 -c "import torch" 2>/dev/null && [ -f ../shared/peer/gpu_anchor.py ]; then
  timeout 150 python3 ../shared/peer/gpu_anchor.py | tee "$OUT/anchor.jsonl"
elif python3 -c "import torch" 2>/dev/null && [ -f shared/peer/gpu_anchor.py ]; then
  timeout 150 python3 shared/peer/gpu_anchor.py | tee "$OUT/anchor.jsonl"
else
  echo "(no torch or gpu_anchor.py here: reference figures not measured)"
fi
