#!/usr/bin/env bash
# The demo against a three-node RabbitMQ cluster and Redis with Sentinel
# (deploy/scripts/cluster.sh), with RabbitMQ node 2 killed (kill -9) a few hundred batches in
# and the Redis primary a few hundred later: the job still completes, every batch once.
set -euo pipefail
cd "$(dirname "$0")/../.."

# 50,000 posts (5,000 batches): long enough to lose two nodes in the middle of it.
export POSTS=${POSTS:-50000}
export TASKMILL_NAMESPACE=${TASKMILL_NAMESPACE:-cluster-demo-$(date +%s)}
DIR=${TASKMILL_CLUSTER_DIR:-/tmp/taskmill-cluster}

deploy/scripts/services.sh
trap 'deploy/scripts/cluster.sh down "$DIR" || true' EXIT
eval "$(deploy/scripts/cluster.sh up "$DIR" | sed 's/^/export /')"
echo "cluster-demo: AMQP_URL=$AMQP_URL" >&2
echo "cluster-demo: REDIS_URL=$REDIS_URL" >&2

# Half-way (a few hundred batches done), node 2 goes.
(
  cargo build --release --workspace --bins --quiet
  for ((i = 0; i < 1200; i++)); do
    done_batches=$(target/release/producer jobs --json 2>/dev/null |
      grep -o '"batches_done":[0-9]*' | head -1 | cut -d: -f2 || true)
    if [ "${done_batches:-0}" -ge 300 ] && [ -z "${node_killed:-}" ]; then
      echo "cluster-demo: $done_batches batches done: killing RabbitMQ node 2 (kill -9)" >&2
      deploy/scripts/cluster.sh kill 2 "$DIR"
      node_killed=1
    fi
    if [ "${done_batches:-0}" -ge 1500 ]; then
      echo "cluster-demo: $done_batches batches done: killing the Redis primary (kill -9)" >&2
      deploy/scripts/cluster.sh kill redis "$DIR"
      exit 0
    fi
    sleep 0.1
  done
) &
killer=$!

set +e
deploy/scripts/demo.sh
code=$?
set -e
wait "$killer" || true
deploy/scripts/cluster.sh status "$DIR" 2>/dev/null | grep -E "^(tm|redis|primary)" || true
exit "$code"
