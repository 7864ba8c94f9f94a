#!/usr/bin/env bash
# End-to-end tests of `llada serve` on loopback with real clients: the official openai package,
# a load test (32 clients, 200 requests), a fuzz test (500 malformed requests, then the hostile
# shapes: content type, origin, body size, score bounds, partial headers, the connection cap) and the live page
# in headless Chromium. Needs: a release build, python3 (a venv with `openai` is made here),
# Debian's chromium, node/npm. Screenshot: out/e2e/page.png (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-tests/golden/tiny}
PORT=${PORT:-18731}
BASE=http://127.0.0.1:$PORT
VENV=${VENV:-out/e2e/venv}
mkdir -p out/e2e

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q openai
fi
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  (cd tests/e2e && npm install --silent --no-audit --no-fund)
fi

. tests/common/serve.sh
start_server out/e2e/server.log "$MODEL" --port "$PORT" --queue 48 --max-batch 8 \
  --header-timeout 3 --max-connections 64

# curl examples of the README
curl -sf "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "The LORD is my shepherd"}], "max_tokens": 16}' >/dev/null
curl -sfN "$BASE/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "In the beginning", "max_tokens": 16, "stream": true}' | grep -q 'data: \[DONE\]'

"$VENV/bin/python" tests/e2e/openai_client.py "$BASE"
python3 tests/e2e/load.py "$BASE" --concurrency 32 --total 200 --max-tokens 16
python3 tests/e2e/fuzz.py "$BASE" 500 --max-connections 64
node tests/e2e/browser.mjs "$BASE" out/e2e/page.png
echo "e2e: ok"
