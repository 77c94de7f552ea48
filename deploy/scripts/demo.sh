#!/usr/bin/env bash
# The demo: two workers analyse 10,000 posts fetched by URL from a local HTTP server.
set -euo pipefail
cd "$(dirname "$0")/../.."

POSTS=${POSTS:-10000}
PORT=${PORT:-8088}
export TASKMILL_NAMESPACE=${TASKMILL_NAMESPACE:-demo}

deploy/scripts/services.sh

echo "demo: building taskmill (release)" >&2
cargo build --release --workspace --bins --quiet

BIN=target/release
LOGS=target/demo
mkdir -p "$LOGS"
pids=()

stop_all() {
  local code=0
  for pid in "${workers[@]:-}"; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${workers[@]:-}"; do
    [ -n "$pid" ] || continue
    if wait "$pid"; then :; else code=$?; echo "demo: worker $pid exited with $code" >&2; fi
  done
  workers=()
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  server=""
  [ -n "${dashboard:-}" ] && kill "$dashboard" 2>/dev/null || true
  dashboard=""
  return "$code"
}
trap 'stop_all || true' EXIT

# A free port for the sample server.
while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
"$BIN/sample-server" --listen "127.0.0.1:$PORT" --posts "$POSTS" 2>"$LOGS/sample-server.log" &
server=$!

workers=()
for i in 1 2; do
  "$BIN/worker" 2>"$LOGS/worker-$i.log" &
  workers+=($!)
done
for ((i = 0; i < 50; i++)); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

# The dashboard, on the first free port from 8080.
DASH_PORT=8080
while (exec 3<>"/dev/tcp/127.0.0.1/$DASH_PORT") 2>/dev/null; do DASH_PORT=$((DASH_PORT + 1)); done
"$BIN/producer" dashboard --listen "127.0.0.1:$DASH_PORT" >/dev/null 2>"$LOGS/dashboard.log" &
dashboard=$!

echo "demo: 2 workers started (logs in $LOGS/), namespace '$TASKMILL_NAMESPACE'" >&2
echo "demo: dashboard on http://127.0.0.1:$DASH_PORT/ (jobs, dead letters, queues, workers)" >&2
echo "demo: enqueueing $POSTS posts from http://127.0.0.1:$PORT/posts/{id} as a post-stats job" >&2
set +e
"$BIN/producer" enqueue --url-template "http://127.0.0.1:$PORT/posts/{id}" --ids "1-$POSTS" \
  --task post-stats --wait
code=$?
set -e

echo
echo "Watch the queues in the RabbitMQ console: http://localhost:15672/#/queues (guest/guest);"
echo "this demo's queues are named '$TASKMILL_NAMESPACE.*'."
echo "The dashboard stops with the demo; to look at this job again:"
echo "  $BIN/producer --namespace $TASKMILL_NAMESPACE dashboard   # http://127.0.0.1:8080/"
echo "demo: stopping the workers (SIGTERM: they drain, then exit)" >&2
stop_all
echo "demo: workers stopped cleanly" >&2
exit "$code"
