# shellcheck shell=bash
# Shared helpers for the ci/*image* scripts (sourced, not run).
# Knobs (environment): PYWORKER_CACHE (default ~/.cache/pyworker), BASE_IMG, IMG, REDIS_IMG.

PYWORKER_CACHE=${PYWORKER_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/pyworker}
BASE_IMG=${BASE_IMG:-pyworker/base:bookworm-slim}
IMG=${IMG:-pyworker/pyworker:dev}
REDIS_IMG=${REDIS_IMG:-pyworker/redis:dev}
# Docker's own CLI may be a standalone build without buildx; the Dockerfiles use the classic syntax
# (no RUN --mount), which the classic builder of any docker version builds.
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${LOG_TAG:-image}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

image_id() { docker image inspect --format '{{.Id}}' "$1"; }

image_label() { # image label-key -> value ('' when missing)
  docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null | sed 's/^<no value>$//'
}

sha256_files() { # sha256 over the names and contents of the given files, in the order given
  local f
  for f in "$@"; do
    printf '%s\0' "${f#"$REPO_ROOT"/}"
    sha256sum <"$f"
  done | sha256sum | cut -c1-64
}

docker_arch() { docker version --format '{{.Server.Arch}}'; }

need_docker() {
  command -v docker >/dev/null || die "docker missing: run 'bash ci/setup-image.sh'"
  timeout 20 docker info >/dev/null 2>&1 || die "no Docker engine answers: run 'bash ci/start-dockerd.sh'"
}

elapsed() { # seconds since $1 (a $SECONDS value)
  echo "$((SECONDS - $1))s"
}
