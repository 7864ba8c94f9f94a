#!/usr/bin/env bash
# LLaDA2's block diffusion step with the exact block cache against the official whole-window
# recompute, on an LLaDA2.0-mini-shaped checkpoint with random weights cut to 8 of its 20 layers
# (benches/configs/llada2-mini-8l.json: the real widths, 256 experts top 8, 6.42 B parameters; the
# full 16.3 B model does not fit 24 GB in bf16), bf16, $THREADS threads (default 2): one step of a
# 32-token block after a prompt of 64 and of 256 tokens, `--cache dual` (the block only) and
# `--cache none` (the window up to the block's end). JSON lines go to out/bench/llada2.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
RUNS=${RUNS:-3}
OUT=out/bench
J="$OUT/llada2.jsonl"
mkdir -p "$OUT"
cargo build --release
L=target/release/llada
grep -m1 'model name' /proc/cpuinfo | tee -a "$J"
ck="$OUT/llada2-mini-8l-bf16"
[ -f "$ck/config.json" ] || $L init --config benches/configs/llada2-mini-8l.json --out "$ck" --dtype bf16 --seed 0
for p in 64 256; do
  for c in dual none; do
    echo "== prompt $p, cache $c"
    $L bench "$ck" --dtype bf16 --threads "$T" --mode step --prompt-len "$p" --gen-length 32 --block-length 32 --cache "$c" --warmup 1 --runs "$RUNS" --json | tee -a "$J"
  done
done
