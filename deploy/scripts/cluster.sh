#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside its own broker (which is left alone):
#
#   deploy/scripts/cluster.sh up [DIR]       start the nodes (and join them into one cluster)
#   deploy/scripts/cluster.sh down [DIR]     stop every node and remove DIR
#   deploy/scripts/cluster.sh status [DIR]   which nodes run, and the cluster's view
#   deploy/scripts/cluster.sh kill N [DIR]   kill -9 node N (1-3)
#   deploy/scripts/cluster.sh start N [DIR]  start node N again (it rejoins the cluster)
#
# Node N is `tmN@localhost`: AMQP on 127.0.0.1:568N, management on 1568N, Erlang distribution
# on 2568N; its config, data and logs live under DIR/nN (DIR defaults to /tmp/taskmill-cluster,
# or $TASKMILL_CLUSTER_DIR). The nodes run as the `rabbitmq` user when the script runs as root
# (they share that user's Erlang cookie), and take about 30 s to form the cluster. `up`
# prints the AMQP_URL and RABBITMQ_API_URL to use:
#
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,...
set -euo pipefail

cmd=${1:-status}
case "$cmd" in
  kill | start) node=${2:?"usage: $0 $cmd N [DIR]"}; dir=${3:-} ;;
  *) node=""; dir=${2:-} ;;
esac
dir=${dir:-${TASKMILL_CLUSTER_DIR:-/tmp/taskmill-cluster}}
NODES=(1 2 3)

log() { echo "cluster: $*" >&2; }

# Runs a command as the user the nodes run as: `rabbitmq` (through su as root, through sudo
# otherwise), else the current user.
as_rabbit() {
  if id rabbitmq >/dev/null 2>&1 && [ "$(id -un)" != rabbitmq ]; then
    if [ "$(id -u)" -eq 0 ]; then
      su rabbitmq -s /bin/sh -c "$(printf '%q ' "$@")"
      return
    elif sudo -n true 2>/dev/null; then
      sudo -n -u rabbitmq "$@"
      return
    fi
  fi
  "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The environment of node N, as `env` arguments.
node_env() {
  local n=$1 d="$dir/n$1"
  echo "RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf RABBITMQ_NODENAME=tm$n@localhost" \
    "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=568$n RABBITMQ_DIST_PORT=2568$n" \
    "RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_MNESIA_BASE=$d/mnesia" \
    "RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/pid" \
    "RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins ERL_EPMD_ADDRESS=127.0.0.1"
}

ctl() { # N args...
  local n=$1
  shift
  # shellcheck disable=SC2046
  as_rabbit env $(node_env "$n") rabbitmqctl -n "tm$n@localhost" "$@"
}

prepare() { # N
  local n=$1 d="$dir/n$1"
  mkdir -p "$d/mnesia" "$d/log"
  : >"$d/rabbitmq-env.conf"
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:568$n
management.tcp.port = 1568$n
management.tcp.ip = 127.0.0.1
loopback_users.guest = true
cluster_partition_handling = pause_minority
EOF
  echo "[rabbitmq_management]." >"$d/enabled_plugins"
  if id rabbitmq >/dev/null 2>&1 && [ "$(id -un)" != rabbitmq ]; then
    if [ "$(id -u)" -eq 0 ]; then
      chown -R rabbitmq:rabbitmq "$dir"
    elif sudo -n true 2>/dev/null; then
      sudo -n chown -R rabbitmq:rabbitmq "$dir"
    fi
  fi
}

start_node() { # N
  local n=$1
  if port_open "568$n"; then
    log "node tm$n is running (127.0.0.1:568$n)"
    return 0
  fi
  [ -f "$dir/n$n/rabbitmq.conf" ] || prepare "$n"
  log "starting node tm$n (AMQP 568$n, management 1568$n)"
  # shellcheck disable=SC2046
  as_rabbit env $(node_env "$n") rabbitmq-server -detached
}

await_node() { # N: its AMQP port opens, then the node says it has fully booted
  local n=$1 i
  for ((i = 0; i < 600; i++)); do
    if port_open "568$n"; then
      ctl "$n" await_startup --timeout 120 >/dev/null
      return 0
    fi
    sleep 0.2
  done
  log "node tm$n did not open port 568$n within 120 s (logs: $dir/n$n/log)"
  return 1
}

kill_node() { # N
  local n=$1 pid
  pid=$(cat "$dir/n$n/pid" 2>/dev/null || true)
  if [ -z "$pid" ] || [ ! -d "/proc/$pid" ]; then
    # No pid file (another DIR, or a node left by a killed run): whoever listens on its port.
    pid=$(ss -Hltnp "sport = :568$n" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
    # Only an Erlang VM (a RabbitMQ node) is ever killed, never another program on the port.
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "beam.smp" ]; then
      log "port 568$n is held by $(cat "/proc/$pid/comm" 2>/dev/null || echo "pid $pid"), not a RabbitMQ node: left alone"
      pid=""
    fi
  fi
  if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then
    if [ "$(id -u)" -eq 0 ]; then kill -9 "$pid"; else as_rabbit kill -9 "$pid"; fi
    # Gone (its ports closed) before this returns, so that a `start` right after starts it.
    while [ -d "/proc/$pid" ]; do sleep 0.1; done
    log "killed node tm$n (pid $pid)"
  else
    log "node tm$n is not running"
  fi
}

urls() {
  local amqp="" api="" n
  for n in "${NODES[@]}"; do
    amqp+="${amqp:+,}amqp://guest:guest@127.0.0.1:568$n/%2f"
    api+="${api:+,}http://127.0.0.1:1568$n/api"
  done
  echo "AMQP_URL=$amqp"
  echo "RABBITMQ_API_URL=$api"
}

case "$cmd" in
  up)
    command -v rabbitmq-server >/dev/null || { log "rabbitmq-server is not installed"; exit 1; }
    mkdir -p "$dir"
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in "${NODES[@]}"; do await_node "$n"; done
    for n in 2 3; do
      if ! ctl "$n" cluster_status --formatter json 2>/dev/null | grep -q "tm1@localhost"; then
        log "joining tm$n to tm1"
        ctl "$n" stop_app >/dev/null
        ctl "$n" join_cluster tm1@localhost >/dev/null
        ctl "$n" start_app >/dev/null
      fi
    done
    for n in "${NODES[@]}"; do await_node "$n"; done
    # New quorum queues get their leader on the node with the fewest (a queue argument would
    # be refused as inequivalent on queues declared without it; a policy is not). Lowest
    # priority: any policy of the user's own wins over it.
    ctl 1 set_policy taskmill-leaders '.*' '{"queue-leader-locator":"balanced"}' \
      --apply-to queues --priority -1 >/dev/null
    log "cluster of tm1, tm2, tm3 up under $dir (quorum queue leaders balanced by policy)"
    urls
    ;;
  down)
    for n in "${NODES[@]}"; do kill_node "$n"; done
    # The Erlang distribution's port mapper stays for the machine's own broker.
    if [ "$(id -u)" -ne 0 ]; then as_rabbit rm -rf "$dir" 2>/dev/null || true; fi
    rm -rf "$dir"
    log "cluster stopped and $dir removed"
    ;;
  status)
    for n in "${NODES[@]}"; do
      if port_open "568$n"; then echo "tm$n: running (127.0.0.1:568$n)"; else echo "tm$n: down"; fi
    done
    for n in "${NODES[@]}"; do
      if port_open "568$n"; then
        ctl "$n" cluster_status 2>/dev/null | sed -n '/Running Nodes/,/Versions/p' | sed '$d'
        break
      fi
    done
    ;;
  kill) kill_node "$node" ;;
  start)
    start_node "$node"
    await_node "$node"
    ;;
  urls) urls ;;
  *)
    echo "usage: $0 up|down|status|kill N|start N|urls [DIR]" >&2
    exit 2
    ;;
esac
