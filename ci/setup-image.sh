#!/usr/bin/env bash
# Install what building and testing the images needs on a fresh Debian 12 machine, idempotently:
#   apt: docker.io (engine + CLI), debootstrap (the base image from Debian's mirror)
#   a running Docker engine (ci/start-dockerd.sh; no systemd needed)
#   pip: pytest, pytest-timeout, websocket-client (tests/image talks to a kernel over websocket)
# Prints each step; safe to run again (does only what is missing).
set -euo pipefail

log() { printf '[%s setup-image] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
PIP_PACKAGES=(pytest pytest-timeout websocket-client)

apt_install() {
  local missing=() cmd pkg
  for pair in dockerd:docker.io debootstrap:debootstrap; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    log "apt: docker.io and debootstrap present"
    return 0
  fi
  [[ $(id -u) == 0 ]] || { log "need root to apt-get install ${missing[*]}"; exit 1; }
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -q >/dev/null
  timeout 900 apt-get install -y -q "${missing[@]}" >/dev/null
  log "apt: installed ${missing[*]}"
}

pip_install() {
  local missing=() p
  for p in "${PIP_PACKAGES[@]}"; do
    "$PYTHON" -m pip show -q "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "pip: ${PIP_PACKAGES[*]} present"
    return 0
  fi
  log "pip install ${missing[*]}"
  # Debian's own python3 is externally managed (PEP 668): allow installing into it for CI.
  "$PYTHON" -m pip install -q "${missing[@]}" 2>/dev/null \
    || "$PYTHON" -m pip install -q --break-system-packages "${missing[@]}"
}

main() {
  local t=$SECONDS
  apt_install
  bash "$HERE/start-dockerd.sh"
  command -v "$PYTHON" >/dev/null || { log "$PYTHON missing"; exit 1; }
  "$PYTHON" -m pip --version >/dev/null 2>&1 || {
    log "apt-get install python3-pip"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip >/dev/null
  }
  pip_install
  log "ready in $((SECONDS - t))s (docker $(docker version --format '{{.Server.Version}}'))"
}

main "$@"
