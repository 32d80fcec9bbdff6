#!/usr/bin/env bash
# Start a Docker engine in the background when none answers (machines without systemd), then wait,
# bounded, until `docker info` works. Idempotent: does nothing when an engine already answers.
#   DOCKERD_LOG   where dockerd writes (default /var/log/pyworker-dockerd.log)
#   DOCKERD_WAIT  seconds to wait for the engine (default 60)
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/pyworker-dockerd.log}
DOCKERD_WAIT=${DOCKERD_WAIT:-60}

log() { printf '[start-dockerd] %s\n' "$*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

live_dockerd() { # a dockerd that is not a zombie (killed engines can linger as zombies)
  local pid
  for pid in $(pgrep -x dockerd || true); do
    grep -q '^State:[[:space:]]*[^Z]' "/proc/$pid/status" 2>/dev/null && return 0
  done
  return 1
}

main() {
  command -v docker >/dev/null || { log "docker CLI missing (apt-get install docker.io)"; exit 1; }
  if engine_up; then
    log "engine already answers"
    return 0
  fi
  command -v dockerd >/dev/null || { log "dockerd missing (apt-get install docker.io)"; exit 1; }
  if live_dockerd; then
    log "a dockerd process exists but does not answer yet; waiting for it"
  else
    # A stale pid file from a killed engine makes dockerd refuse to start.
    local pidfile=/var/run/docker.pid
    if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
      rm -f "$pidfile"
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # setsid + nohup: the engine outlives this script and the shell that ran it.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  local deadline=$((SECONDS + DOCKERD_WAIT))
  until engine_up; do
    if ((SECONDS >= deadline)); then
      log "engine did not answer within ${DOCKERD_WAIT}s; last lines of $DOCKERD_LOG:"
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "engine up after $((SECONDS))s: $(docker version --format 'server {{.Server.Version}}' 2>/dev/null)"
}

main "$@"
