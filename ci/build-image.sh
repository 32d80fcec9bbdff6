#!/usr/bin/env bash
# Build pyworker's images offline (Debian mirror + PyPI only, no container registry).
#   ci/build-image.sh pyworker   $IMG       (default pyworker/pyworker:dev), from image/Dockerfile
#   ci/build-image.sh redis      $REDIS_IMG (default pyworker/redis:dev), from image/redis.Dockerfile
#   ci/build-image.sh wheelhouse  only resolve/download the pinned wheels into the cache
#   ci/build-image.sh all        base, wheelhouse, both images
#   ci/build-image.sh lock       regenerate image/requirements.lock from image/requirements.in
# Each image carries a label with the hash of its inputs (Dockerfile, lock, pyworker's sources,
# the base image's id, this script); an image whose label matches is not rebuilt (FORCE=1 does).
# Cached under $PYWORKER_CACHE (~/.cache/pyworker): base/ (the base image as a tar) and
# wheelhouse/<arch>-<python>-<lock hash>/ (the wheels of image/requirements.lock).
set -euo pipefail
LOG_TAG=image
# shellcheck source=ci/lib-image.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-image.sh"

FORCE=${FORCE:-0}
IMAGE_DIR=$REPO_ROOT/image
LOCK=$IMAGE_DIR/requirements.lock
INPUTS_LABEL=io.pyworker.image.inputs
VENV_TOOLS_IMG=${VENV_TOOLS_IMG:-pyworker/venv-tools:dev}
STAGE=""

cleanup() { if [[ -n $STAGE && -d $STAGE ]]; then rm -rf "$STAGE"; fi; }
trap cleanup EXIT

new_stage() { STAGE=$(mktemp -d "${TMPDIR:-/tmp}/pyworker-image.XXXXXX"); }

ensure_base() { bash "$REPO_ROOT/ci/build-base.sh"; }

# The stage of image/Dockerfile that has python3-venv: creates venvs for resolving wheels/locks.
ensure_venv_tools() {
  local ctx t=$SECONDS
  ctx=$(mktemp -d "${TMPDIR:-/tmp}/pyworker-ctx.XXXXXX")
  cp "$IMAGE_DIR/Dockerfile" "$ctx/Dockerfile"
  if ! docker build -q --force-rm --target venv-tools --build-arg "BASE=$BASE_IMG" \
      -t "$VENV_TOOLS_IMG" "$ctx" >"$ctx.log" 2>&1; then
    cat "$ctx.log" >&2; rm -rf "$ctx" "$ctx.log"; die "building $VENV_TOOLS_IMG failed"
  fi
  rm -rf "$ctx" "$ctx.log"
  log "$VENV_TOOLS_IMG ready ($(elapsed "$t"))"
}

# Mount the host's CA bundle (PIP_CERT, a TLS proxy's) only into throwaway resolver containers.
ca_args() {
  CA_ARGS=()
  if [[ -n ${PIP_CERT:-} && -f $PIP_CERT ]]; then
    CA_ARGS=(-v "$(readlink -f "$PIP_CERT"):/run/pyworker-ca.crt:ro" -e PIP_CERT=/run/pyworker-ca.crt)
  fi
  [[ -z ${PIP_INDEX_URL:-} ]] || CA_ARGS+=(-e "PIP_INDEX_URL=$PIP_INDEX_URL")
  CA_ARGS+=(-e "PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-60}" -e PIP_DISABLE_PIP_VERSION_CHECK=1)
}

# Sets WHEELHOUSE to the cached wheelhouse of the lock, resolving it first when missing.
ensure_wheelhouse() {
  [[ -s $LOCK ]] || die "$LOCK missing: run 'make image-lock'"
  ensure_base
  ensure_venv_tools
  local pytag arch lockhash
  pytag=$(docker run --rm --network none "$VENV_TOOLS_IMG" \
    python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  arch=$(docker_arch)
  lockhash=$(sha256sum <"$LOCK" | cut -c1-16)
  WHEELHOUSE=$PYWORKER_CACHE/wheelhouse/$arch-$pytag-$lockhash
  if [[ -f $WHEELHOUSE/.complete ]]; then
    log "wheelhouse cached: $WHEELHOUSE ($(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels)"
    return 0
  fi
  local t=$SECONDS tmp
  mkdir -p "$PYWORKER_CACHE/wheelhouse"
  tmp=$(mktemp -d "$WHEELHOUSE.partial.XXXXXX")
  chmod 0755 "$tmp"
  ca_args
  log "resolving the wheelhouse of image/requirements.lock with the image's Python ($pytag)"
  # The image's own interpreter decides platform tags and markers; runs as the calling user.
  docker run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp "${CA_ARGS[@]}" \
    -v "$LOCK:/run/requirements.lock:ro" -v "$tmp:/wheelhouse" "$VENV_TOOLS_IMG" \
    bash -o pipefail -ec 'python3 -m venv /tmp/v
      /tmp/v/bin/pip download -q --only-binary=:all: --no-deps -d /wheelhouse -r /run/requirements.lock
      # the lock must be complete: every dependency pinned, nothing missing
      /tmp/v/bin/pip install -q --no-index --find-links /wheelhouse -r /run/requirements.lock
      /tmp/v/bin/pip check' \
    || { rm -rf "$tmp"; die "resolving the wheelhouse failed"; }
  touch "$tmp/.complete"
  rm -rf "$WHEELHOUSE"
  mv "$tmp" "$WHEELHOUSE"
  log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1) in $(elapsed "$t")"
}

# pyworker's packaging inputs: what its wheel is built from (and hashed).
project_files() {
  local f
  for f in pyproject.toml setup.py setup.cfg MANIFEST.in README.md README.rst LICENSE LICENSE.txt; do
    [[ -f $REPO_ROOT/$f ]] && printf '%s\n' "$REPO_ROOT/$f"
  done
  find "$REPO_ROOT/pyworker" -type f -not -path '*/__pycache__/*' -not -name '*.py[co]' | LC_ALL=C sort
}

build_pyworker_wheel() { # $1: output dir
  local src=$STAGE/src
  mkdir -p "$src"
  project_files | sed "s|^$REPO_ROOT/||" | tar -C "$REPO_ROOT" -cf - -T - | tar -C "$src" -xf -
  # A copy, so the build leaves no build/ or *.egg-info in the work tree.
  pip_cmd wheel -q --no-deps "$src" -w "$1" >"$STAGE/wheel.log" 2>&1 \
    || { cat "$STAGE/wheel.log" >&2; die "pip wheel of pyworker failed"; }
}

pip_cmd() {
  python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip missing (apt-get install python3-pip)"
  python3 -m pip "$@"
}

# Regenerate image/requirements.lock: resolve image/requirements.in plus pyworker's own
# dependencies with the image's Python in a throwaway container, then freeze (--all keeps
# setuptools, which JupyterLab's extension machinery imports).
update_lock() {
  ensure_base
  ensure_venv_tools
  local t=$SECONDS
  new_stage
  mkdir -p "$STAGE/dist"
  build_pyworker_wheel "$STAGE/dist"
  cp "$IMAGE_DIR/requirements.in" "$STAGE/requirements.in"
  chmod -R a+rX "$STAGE"
  ca_args
  log "resolving image/requirements.in + pyworker's dependencies (latest allowed versions)"
  docker run --rm --user "$(id -u):$(id -g)" -e HOME=/tmp "${CA_ARGS[@]}" -v "$STAGE:/in:ro" \
    "$VENV_TOOLS_IMG" bash -o pipefail -ec 'python3 -m venv /tmp/v
      /tmp/v/bin/pip install -q --upgrade pip
      /tmp/v/bin/pip install -q --only-binary=:all: -r /in/requirements.in /in/dist/pyworker-*.whl
      /tmp/v/bin/pip check >&2
      /tmp/v/bin/pip freeze --all --exclude pyworker' >"$STAGE/freeze.txt" \
    || die "resolving the lock failed"
  {
    # shellcheck disable=SC2016 # backquotes meant literally
    printf '# Generated by `make image-lock` (ci/build-image.sh lock) from image/requirements.in and\n'
    printf "# pyworker's dependencies, resolved with the image's Python. Do not edit by hand.\n"
    cat "$STAGE/freeze.txt"
  } >"$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  log "wrote image/requirements.lock: $(grep -c '==' "$LOCK") pins in $(elapsed "$t")"
}

build_pyworker() {
  ensure_wheelhouse
  local inputs sources
  mapfile -t sources < <(project_files)
  inputs=$(
    {
      sha256_files "$IMAGE_DIR/Dockerfile" "$LOCK" "$IMAGE_DIR/ipython_kernel_config.py" "$IMAGE_DIR/overrides.json" \
        "${BASH_SOURCE[0]}" "${sources[@]}"
      image_id "$BASE_IMG"
    } | sha256sum | cut -c1-64
  )
  if [[ $FORCE != 1 ]] && image_exists "$IMG" && [[ $(image_label "$IMG" "$INPUTS_LABEL") == "$inputs" ]]; then
    log "$IMG is up to date (inputs ${inputs:0:12})"
    return 0
  fi
  local t=$SECONDS
  new_stage
  mkdir -p "$STAGE/ctx/dist"
  cp "$IMAGE_DIR/Dockerfile" "$LOCK" "$IMAGE_DIR/ipython_kernel_config.py" "$IMAGE_DIR/overrides.json" "$STAGE/ctx/"
  cp -al "$WHEELHOUSE" "$STAGE/ctx/wheelhouse" 2>/dev/null || cp -a "$WHEELHOUSE" "$STAGE/ctx/wheelhouse"
  rm -f "$STAGE/ctx/wheelhouse/.complete"
  log "building pyworker's wheel"
  build_pyworker_wheel "$STAGE/ctx/dist"
  local whl version
  whl=$(basename "$(ls "$STAGE"/ctx/dist/pyworker-*.whl)")
  version=$(cut -d- -f2 <<<"$whl")
  log "docker build $IMG (pyworker $version, base $BASE_IMG)"
  docker build --force-rm --build-arg "BASE=$BASE_IMG" \
    --label "$INPUTS_LABEL=$inputs" --label "org.opencontainers.image.version=$version" \
    -t "$IMG" "$STAGE/ctx" 2>&1 | sed -u 's/^/    /' >&2
  prune_dangling
  log "$IMG built in $(elapsed "$t"): $(docker image inspect --format '{{.Size}}' "$IMG" | awk '{printf "%d MB", $1/1e6}')"
}

# Earlier builds of our images, untagged by this one; only images carrying our inputs label.
prune_dangling() {
  docker image prune -f --filter "label=$INPUTS_LABEL" >/dev/null || true
}

build_redis() {
  ensure_base
  local inputs
  inputs=$({ sha256_files "$IMAGE_DIR/redis.Dockerfile" "${BASH_SOURCE[0]}"; image_id "$BASE_IMG"; } | sha256sum | cut -c1-64)
  if [[ $FORCE != 1 ]] && image_exists "$REDIS_IMG" && [[ $(image_label "$REDIS_IMG" "$INPUTS_LABEL") == "$inputs" ]]; then
    log "$REDIS_IMG is up to date (inputs ${inputs:0:12})"
    return 0
  fi
  local t=$SECONDS
  new_stage
  mkdir -p "$STAGE/ctx"
  cp "$IMAGE_DIR/redis.Dockerfile" "$STAGE/ctx/Dockerfile"
  log "docker build $REDIS_IMG (base $BASE_IMG)"
  docker build --force-rm --build-arg "BASE=$BASE_IMG" --label "$INPUTS_LABEL=$inputs" \
    -t "$REDIS_IMG" "$STAGE/ctx" 2>&1 | sed -u 's/^/    /' >&2
  prune_dangling
  log "$REDIS_IMG built in $(elapsed "$t"): $(docker image inspect --format '{{.Size}}' "$REDIS_IMG" | awk '{printf "%d MB", $1/1e6}')"
}

main() {
  need_docker
  case ${1:-all} in
    pyworker) build_pyworker ;;
    redis) build_redis ;;
    wheelhouse) ensure_wheelhouse ;;
    lock) update_lock ;;
    all) build_pyworker; build_redis ;;
    *) die "usage: $0 [pyworker|redis|wheelhouse|all|lock]" ;;
  esac
}

main "$@"
