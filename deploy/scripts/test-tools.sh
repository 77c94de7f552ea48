#!/usr/bin/env bash
# Makes sure the test suite has what it needs beyond the services and the browser:
# iproute2 (the network-partition test puts workers in network namespaces) and cargo-nextest
# (which kills a hung test after 3 minutes; `make test` falls back to `cargo test` under an
# overall time limit when it cannot be installed).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log() { echo "test-tools: $*" >&2; }

if ! command -v ip >/dev/null; then
  log "installing iproute2 with apt-get"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi
if ! command -v cargo-nextest >/dev/null; then
  log "installing cargo-nextest with cargo (a few minutes, once)"
  cargo install --locked cargo-nextest >/dev/null 2>&1 || log "could not install cargo-nextest: the tests run with cargo test"
fi
