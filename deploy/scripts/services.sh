#!/usr/bin/env bash
# Makes sure RabbitMQ (with its management console) and Redis are reachable on this machine:
# uses running ones, else starts installed ones, else installs them with apt-get (Debian).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { echo "services: $*" >&2; }

if ! command -v cargo >/dev/null; then
  log "no Rust toolchain (cargo) on this machine: install one with rustup,"
  log "  curl https://sh.rustup.rs -sSf | sh -s -- -y && . \"\$HOME/.cargo/env\""
  log "(taskmill needs Rust 1.85 or newer; Debian's packaged cargo is too old)"
  exit 1
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds what
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    if port_open "$1"; then return 0; fi
    sleep 0.2
  done
  log "$3 did not open port $1 within $2 s"
  return 1
}

apt_install() {
  log "installing $* with apt-get"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Redis -----------------------------------------------------------------------------------
if port_open 6379; then
  log "Redis is running on 127.0.0.1:6379"
else
  command -v redis-server >/dev/null || apt_install redis-server
  # The package may have started it through its init script.
  if ! wait_port 6379 2 "Redis" 2>/dev/null; then
    log "starting Redis"
    dir=/var/lib/redis logdir=/var/log/redis
    if ! $SUDO mkdir -p "$dir" "$logdir" 2>/dev/null; then
      dir=$(mktemp -d) logdir=$dir
    fi
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir "$dir" --logfile "$logdir/ci.log" ||
      $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
        --appendonly no --dir "$dir" --logfile "$logdir/ci.log"
    wait_port 6379 30 "Redis"
  fi
fi

# --- RabbitMQ --------------------------------------------------------------------------------
if port_open 5672; then
  log "RabbitMQ is running on 127.0.0.1:5672"
else
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  if ! wait_port 5672 2 "RabbitMQ" 2>/dev/null; then
    log "starting RabbitMQ"
    $SUDO rabbitmq-server -detached
    $SUDO timeout 120 rabbitmqctl await_startup >/dev/null
    wait_port 5672 60 "RabbitMQ"
  fi
fi

# --- Management console (queue views, the tests' clean-up) ----------------------------------
if port_open 15672; then
  log "RabbitMQ management console on http://127.0.0.1:15672"
else
  log "enabling the RabbitMQ management plugin"
  $SUDO rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port 15672 90 "the RabbitMQ management console"
  log "RabbitMQ management console on http://127.0.0.1:15672"
fi

# --- Python with venv and pip (the Python client's tests install it in a fresh virtualenv) --
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3 python3-venv python3-pip
fi
