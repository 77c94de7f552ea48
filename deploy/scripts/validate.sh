#!/usr/bin/env bash
# Validates the deployment files that cannot be run on a machine without a Docker engine:
# docker-compose.yml through a compose parser (Debian's docker-compose package).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v docker-compose >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "validate: installing docker-compose (a compose parser) with apt-get" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml --profile enqueue config --services | sort | tr '\n' ' ' >&2
echo "← docker-compose.yml is valid" >&2
