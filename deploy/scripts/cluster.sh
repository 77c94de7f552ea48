#!/usr/bin/env bash
# A three-node RabbitMQ cluster and Redis with Sentinel on this machine, beside its own broker
# and Redis (which are left alone):
#
#   deploy/scripts/cluster.sh up [DIR]       start the nodes (and join them into one cluster)
#   deploy/scripts/cluster.sh down [DIR]     stop every node and remove DIR
#   deploy/scripts/cluster.sh status [DIR]   which nodes run, and the cluster's view
#   deploy/scripts/cluster.sh kill N [DIR]   kill -9 RabbitMQ node N (1-3)
#   deploy/scripts/cluster.sh start N [DIR]  start node N again (it rejoins the cluster)
#   deploy/scripts/cluster.sh stop N [DIR]   stop RabbitMQ on node N as a rolling upgrade does
#                                            (stop_app: its connections are closed, its queue
#                                            replicas stop; the node's VM stays; `start N`)
#   deploy/scripts/cluster.sh restart N [DIR] stop N, then start N
#   deploy/scripts/cluster.sh kill redis     kill -9 the Redis primary (the sentinels promote
#                                            a replica within seconds)
#   deploy/scripts/cluster.sh start redis    start the Redis nodes that are down, as replicas
#                                            of the primary the sentinels name
#
# Redis: a primary and two replicas on 127.0.0.1:6391-6393 (no persistence, as the machine's
# own), three sentinels on 26391-26393 watching it as `taskmill` (quorum 2); files under
# DIR/redis. Two replicas, so that with the primary gone a write still reaches a replica
# (the workers WAIT for one before they ack).
#
# Node N is `tmN@localhost`: AMQP on 127.0.0.1:568N, management on 1568N, Erlang distribution
# on 2568N; its config, data and logs live under DIR/nN (DIR defaults to /tmp/taskmill-cluster,
# or $TASKMILL_CLUSTER_DIR). The nodes run as the `rabbitmq` user when the script runs as root
# (they share that user's Erlang cookie), and take about 30 s to form the cluster. `up`
# prints the AMQP_URL and RABBITMQ_API_URL to use:
#
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,...
#   REDIS_URL=redis+sentinel://127.0.0.1:26391,127.0.0.1:26392,127.0.0.1:26393/taskmill/0
set -euo pipefail

cmd=${1:-status}
case "$cmd" in
  kill | start | stop | restart) node=${2:?"usage: $0 $cmd N [DIR]"}; dir=${3:-} ;;
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
  local n=$1 pid
  if port_open "568$n"; then
    log "node tm$n is running (127.0.0.1:568$n)"
    return 0
  fi
  pid=$(cat "$dir/n$n/pid" 2>/dev/null || true)
  if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then
    # Stopped with `stop` (stop_app): its VM runs, RabbitMQ in it starts again.
    log "starting RabbitMQ on tm$n again (start_app)"
    ctl "$n" start_app >/dev/null
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

# --- Redis with Sentinel -------------------------------------------------------------------
REDIS_NODES=(1 2 3)
MASTER=taskmill

redis_cli() { redis-cli -h 127.0.0.1 "$@"; }

# The port of the primary the sentinels name (empty when none answers).
redis_primary() {
  local n
  for n in "${REDIS_NODES[@]}"; do
    if port_open "2639$n"; then
      redis_cli -p "2639$n" sentinel get-master-addr-by-name "$MASTER" 2>/dev/null | sed -n 2p
      return 0
    fi
  done
}

start_redis_node() { # N [PRIMARY_PORT]
  local n=$1 primary=${2:-} d="$dir/redis"
  if port_open "639$n"; then return 0; fi
  mkdir -p "$d/d$n"
  local args=(--port "639$n" --bind 127.0.0.1 --save "" --appendonly no --dir "$d/d$n"
    --daemonize yes --pidfile "$d/d$n.pid" --logfile "$d/d$n.log")
  if [ -n "$primary" ] && [ "$primary" != "639$n" ]; then
    args+=(--replicaof 127.0.0.1 "$primary")
    log "starting Redis on 639$n (replica of $primary)"
  else
    log "starting Redis on 639$n (primary)"
  fi
  redis-server "${args[@]}"
}

start_sentinel() { # N
  local n=$1 d="$dir/redis"
  if port_open "2639$n"; then return 0; fi
  printf '%s\n' "port 2639$n" "bind 127.0.0.1" "daemonize yes" "pidfile $d/sentinel$n.pid" \
    "logfile $d/sentinel$n.log" "dir $d" "sentinel monitor $MASTER 127.0.0.1 6391 2" \
    "sentinel down-after-milliseconds $MASTER 2000" "sentinel failover-timeout $MASTER 10000" \
    "sentinel parallel-syncs $MASTER 1" >"$d/sentinel$n.conf"
  redis-server "$d/sentinel$n.conf" --sentinel
}

redis_up() {
  command -v redis-server >/dev/null || { log "redis-server is not installed"; return 1; }
  mkdir -p "$dir/redis"
  local primary n i
  primary=$(redis_primary || true)
  for n in "${REDIS_NODES[@]}"; do start_redis_node "$n" "${primary:-6391}"; done
  for n in "${REDIS_NODES[@]}"; do start_sentinel "$n"; done
  for ((i = 0; i < 300; i++)); do
    if [ "$(redis_cli -p 26391 sentinel replicas "$MASTER" 2>/dev/null | grep -c '^ip$')" -ge 2 ] &&
      [ "$(redis_cli -p 26391 sentinel sentinels "$MASTER" 2>/dev/null | grep -c '^ip$')" -ge 2 ] &&
      [ "$(redis_cli -p "$(redis_primary)" info replication 2>/dev/null | grep -c 'state=online')" -ge 2 ]; then
      log "Redis primary on $(redis_primary), two replicas, three sentinels, under $dir/redis"
      return 0
    fi
    sleep 0.1
  done
  log "the sentinels did not see each other and both replicas in sync within 30 s (logs: $dir/redis)"
  return 1
}

# Kills (-9) the redis-server whose pid FILE names, if it is one.
kill_redis_pidfile() { # FILE NAME
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  if [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null; then
    kill -9 "$pid"
    while [ -d "/proc/$pid" ]; do sleep 0.05; done
    log "killed $2 (pid $pid)"
  fi
}

redis_kill_primary() {
  local port n
  port=$(redis_primary || true)
  [ -n "$port" ] || { log "no sentinel names a primary"; return 1; }
  for n in "${REDIS_NODES[@]}"; do
    if [ "639$n" = "$port" ]; then kill_redis_pidfile "$dir/redis/d$n.pid" "the Redis primary on $port"; fi
  done
}

redis_down() {
  local n
  for n in "${REDIS_NODES[@]}"; do
    kill_redis_pidfile "$dir/redis/sentinel$n.pid" "sentinel 2639$n"
    kill_redis_pidfile "$dir/redis/d$n.pid" "Redis 639$n"
  done
}

urls() {
  local amqp="" api="" n
  for n in "${NODES[@]}"; do
    amqp+="${amqp:+,}amqp://guest:guest@127.0.0.1:568$n/%2f"
    api+="${api:+,}http://127.0.0.1:1568$n/api"
  done
  echo "AMQP_URL=$amqp"
  echo "RABBITMQ_API_URL=$api"
  echo "REDIS_URL=redis+sentinel://127.0.0.1:26391,127.0.0.1:26392,127.0.0.1:26393/$MASTER/0"
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
    redis_up
    urls
    ;;
  down)
    redis_down
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
    for n in "${REDIS_NODES[@]}"; do
      if port_open "639$n"; then
        echo "redis 639$n: $(redis_cli -p "639$n" role 2>/dev/null | head -1)"
      else
        echo "redis 639$n: down"
      fi
    done
    echo "primary named by the sentinels: $(redis_primary || true)"
    ;;
  kill)
    if [ "$node" = redis ]; then redis_kill_primary; else kill_node "$node"; fi
    ;;
  start)
    if [ "$node" = redis ]; then
      redis_up
    else
      start_node "$node"
      await_node "$node"
    fi
    ;;
  stop)
    log "stopping RabbitMQ on tm$node (stop_app)"
    ctl "$node" stop_app >/dev/null
    ;;
  restart)
    log "stopping RabbitMQ on tm$node (stop_app)"
    ctl "$node" stop_app >/dev/null
    start_node "$node"
    await_node "$node"
    ;;
  urls) urls ;;
  *)
    echo "usage: $0 up|down|status|kill N|redis|start N|redis|stop N|restart N|urls [DIR]" >&2
    exit 2
    ;;
esac
