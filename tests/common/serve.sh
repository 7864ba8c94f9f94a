# Sourced by the end-to-end scripts: `start_server LOG ARGS...` starts `llada serve ARGS...` in the
# background (stopped when the script exits) and waits for $BASE/health; on failure it prints
# the server's log and exits.
start_server() {
  local log=$1
  shift
  target/release/llada serve "$@" > "$log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    curl -sf "$BASE/health" >/dev/null && return 0
    sleep 0.2
  done
  curl -sf "$BASE/health" >/dev/null || { cat "$log"; exit 1; }
}
