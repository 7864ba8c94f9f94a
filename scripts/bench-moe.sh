#!/usr/bin/env bash
# LLaDA-MoE-7B-A1B's step cost next to a dense model of equal active parameters and to LLaDA-8B,
# in one run on this machine: checkpoints with random weights from the benchmark configs
# (`llada init`, bf16, written once into out/bench/), $THREADS threads (default 2); one forward of
# 96 tokens and one dual-cache step of a 32-token block (prompt 64 + answer 32), with the peak RSS
# after loading. JSON lines go to out/bench/${JSONL:-moe.jsonl}. Usage: scripts/bench-moe.sh
# [names…] (names of benches/configs/*.json: llada-moe-7b-a1b dense-as-moe-active llada-8b by
# default; scripts/bench-dream.sh runs dream-7b and llada-8b).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
RUNS=${RUNS:-3}
OUT=out/bench
J="$OUT/${JSONL:-moe.jsonl}"
mkdir -p "$OUT"
cargo build --release
L=target/release/llada
NAMES=${*:-llada-moe-7b-a1b dense-as-moe-active llada-8b}
grep -m1 'model name' /proc/cpuinfo | tee -a "$J"
for n in $NAMES; do
  ck="$OUT/$n-bf16"
  [ -f "$ck/config.json" ] || $L init --config "benches/configs/$n.json" --out "$ck" --dtype bf16 --seed 0
  echo "== $n"
  $L bench "$ck" --dtype bf16 --threads "$T" --mode forward --len 96 --warmup 1 --runs "$RUNS" --json | tee -a "$J"
  $L bench "$ck" --dtype bf16 --threads "$T" --mode step --prompt-len 64 --gen-length 32 --block-length 32 --cache dual --warmup 1 --runs "$RUNS" --json | tee -a "$J"
done
