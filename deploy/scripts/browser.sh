#!/usr/bin/env bash
# Makes sure the dashboard's browser tests can run: Debian's Chromium, Node.js with npm, and
# playwright-core (pinned in tests/dashboard/package-lock.json; it drives the system's
# Chromium, so no browser is downloaded).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log() { echo "browser: $*" >&2; }
apt_install() {
  log "installing $* with apt-get"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v chromium >/dev/null || apt_install chromium
command -v npm >/dev/null || apt_install nodejs npm
if [ ! -d tests/dashboard/node_modules/playwright-core ]; then
  log "installing playwright-core with npm"
  (cd tests/dashboard && npm ci --no-audit --no-fund --loglevel=error)
fi
