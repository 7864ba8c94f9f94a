#!/usr/bin/env bash
# Serving figures on this machine: throughput and p50/p99 latency for 1, 4 and 16 concurrent
# chat clients on the shipped model (max_tokens 32, the server's defaults: threshold 0.9, dual
# cache), with request batching (--max-batch 8) and without (--max-batch 1). JSON lines into
# out/bench/server.jsonl. Usage: scripts/bench-server.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/bench
mkdir -p "$OUT"
cargo build --release
PORT=${PORT:-8391}
for mb in 8 1; do
  target/release/llada serve --port "$PORT" --max-batch "$mb" --threads "${THREADS:-2}" >/dev/null 2>&1 &
  PID=$!
  trap 'kill $PID 2>/dev/null || true' EXIT
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
  for c in 1 4 16; do
    total=$(( c * 6 ))
    r=$(python3 tests/e2e/load.py "http://127.0.0.1:$PORT" --concurrency "$c" --total "$total" --max-tokens 32)
    echo "{\"max_batch\": $mb, \"load\": $r}" | tee -a "$OUT/server.jsonl"
  done
  kill $PID; wait $PID 2>/dev/null || true
done
