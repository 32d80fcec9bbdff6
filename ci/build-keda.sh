#!/usr/bin/env bash
# Build KEDA (the event-driven autoscaler the chart's `autoscaling.enabled` uses) for the offline test
# cluster, skipping whatever is already cached (keyed by version):
#   bins:   keda-operator and keda-adapter (the external metrics API server) from the Go module
#           github.com/kedacore/keda/v2 through a wrapper module, plus its CRDs (config/crd/bases
#           of the same module zip) -> $KEDA_BIN_DIR
#   images: $KEDA_OPERATOR_IMAGE and $KEDA_ADAPTER_IMAGE: the project's debootstrap base image plus
#           the binary, saved as tarballs in $IMAGES_DIR (no registry)
# The admission webhooks are not built: they only validate ScaledObjects, nothing here needs them.
# Durations go to $CLUSTER_CACHE/timings.log. Usage: ci/build-keda.sh [bins|images|all]
# ci/cluster-build.sh runs `bins` next to the Kubernetes build and `images` after it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

export GOMODCACHE=$GO_CACHE_ROOT/mod GOCACHE=$GO_CACHE_ROOT/build
export GOFLAGS="-modcacherw -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0
WORK=$CLUSTER_CACHE/work
KEDA_MODULE=github.com/kedacore/keda/v2
BASE_IMG=${BASE_IMG:-pyworker/base:bookworm-slim}
tmp_dirs=()
cleanup() { local d; for d in "${tmp_dirs[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT
# binary -> its package under $KEDA_MODULE/cmd
declare -A KEDA_CMDS=([keda-operator]=operator [keda-adapter]=adapter)

have_keda_bins() {
  local b
  for b in "${!KEDA_CMDS[@]}"; do [[ -x $KEDA_BIN_DIR/$b ]] || return 1; done
  [[ -s $KEDA_BIN_DIR/crds/keda.sh_scaledobjects.yaml && -s $KEDA_BIN_DIR/manifests/api_service.yaml ]]
}

# KEDA's own manifests of this version, used as they are by ci/keda-install.sh (our Deployments
# replace upstream's, which name registry images): the CRDs, and the namespace, RBAC, Services and
# APIService of config/ in the module zip.
KEDA_MANIFESTS=(general/namespace.yaml service_account/service_account.yaml rbac/role.yaml
  rbac/role_binding.yaml rbac/aggregate_cluster_roles.yaml metrics-server/role.yaml
  metrics-server/role_binding.yaml metrics-server/service.yaml metrics-server/api_service.yaml
  manager/service.yaml)
copy_keda_manifests() {
  local src=$1 f
  mkdir -p "$KEDA_BIN_DIR/crds" "$KEDA_BIN_DIR/manifests"
  cp "$src"/config/crd/bases/*.yaml "$KEDA_BIN_DIR/crds/"
  for f in "${KEDA_MANIFESTS[@]}"; do
    # metrics-server/service.yaml and manager/service.yaml: both service.yaml
    cp "$src/config/$f" "$KEDA_BIN_DIR/manifests/$(dirname "$f")-$(basename "$f")"
  done
  mv "$KEDA_BIN_DIR/manifests/metrics-server-api_service.yaml" "$KEDA_BIN_DIR/manifests/api_service.yaml"
  chmod 0644 "$KEDA_BIN_DIR"/crds/*.yaml "$KEDA_BIN_DIR"/manifests/*.yaml
  log "keda v$KEDA_VERSION: $(ls "$KEDA_BIN_DIR/crds" | wc -l) CRDs and ${#KEDA_MANIFESTS[@]} manifests from $src/config"
}

# The wrapper module: requires KEDA and repeats its go.mod's replace and exclude directives (a
# dependency's own are ignored by Go, and KEDA needs its replace to resolve at all).
keda_wrapper_module() {
  local dir=$1 gomod
  gomod=$(go mod download -json "$KEDA_MODULE@v$KEDA_VERSION" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("GoMod") or sys.exit(d.get("Error")))')
  mkdir -p "$dir"
  cd "$dir"
  rm -f go.mod go.sum
  go mod init offline.local/keda-build 2>/dev/null
  go mod edit -require="$KEDA_MODULE@v$KEDA_VERSION"
  local args
  mapfile -t args < <(go mod edit -json "$gomod" | python3 -c '
import json, sys
m = json.load(sys.stdin)
def at(mod):
    return mod["Path"] + ("@" + mod["Version"] if mod.get("Version") else "")
for r in m.get("Replace") or []:
    if r["New"]["Path"].startswith("."):
        continue  # a path inside KEDA'"'"'s own repository: not in the module zip, and not needed to build
    print("-replace=" + at(r["Old"]) + "=" + at(r["New"]))
for e in m.get("Exclude") or []:
    print("-exclude=" + at(e))
')
  ((${#args[@]} == 0)) || go mod edit "${args[@]}"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    local b; for b in "${!KEDA_CMDS[@]}"; do printf '\t_ "%s/cmd/%s"\n' "$KEDA_MODULE" "${KEDA_CMDS[$b]}"; done
    printf ')\n'
  } >tools.go
  go mod tidy
}

build_keda_bins() {
  if have_keda_bins; then log "keda v$KEDA_VERSION: cached in $KEDA_BIN_DIR"; return 0; fi
  local dir=$WORK/keda-v$KEDA_VERSION t0=$SECONDS b missing=0
  for b in "${!KEDA_CMDS[@]}"; do [[ -x $KEDA_BIN_DIR/$b ]] || missing=1; done
  mkdir -p "$KEDA_BIN_DIR"
  if ((missing)); then
    log "keda v$KEDA_VERSION: module download + tidy through a wrapper module (GOMODCACHE=$GOMODCACHE)"
    (keda_wrapper_module "$dir")
    record_time "keda-v$KEDA_VERSION modules" $((SECONDS - t0)) "(download + tidy)"
    local ldf="-s -w -X $KEDA_MODULE/version.Version=$KEDA_VERSION -X $KEDA_MODULE/version.GitCommit=v$KEDA_VERSION"
    local t1
    # The operator first: it compiles nearly every package (all scalers), so the adapter is mostly cached.
    for b in keda-operator keda-adapter; do
      [[ -x $KEDA_BIN_DIR/$b ]] && continue
      t1=$SECONDS
      log "keda v$KEDA_VERSION: building $b"
      (cd "$dir" && go build -trimpath -ldflags "$ldf" -o "$KEDA_BIN_DIR/$b.tmp" "$KEDA_MODULE/cmd/${KEDA_CMDS[$b]}")
      mv "$KEDA_BIN_DIR/$b.tmp" "$KEDA_BIN_DIR/$b"
      record_time "$b v$KEDA_VERSION" $((SECONDS - t1)) "($(du -h "$KEDA_BIN_DIR/$b" | cut -f1))"
    done
  fi
  # The manifests need KEDA's module zip alone (not its dependencies).
  copy_keda_manifests "$(go mod download -json "$KEDA_MODULE@v$KEDA_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  record_time "keda-v$KEDA_VERSION total" $((SECONDS - t0))
}

image_tar() { echo "$IMAGES_DIR/$(echo "$1" | tr '/:' '__').tar"; }

# One image per binary: the project's base image (Debian, built offline by ci/build-base.sh) plus
# the binary, run as a numeric non-root user (so runAsNonRoot can check it). Saved as a tarball,
# which ci/keda-install.sh imports into the cluster's containerd without a Docker engine.
build_keda_images() {
  local -A images=([keda-operator]=$KEDA_OPERATOR_IMAGE [keda-adapter]=$KEDA_ADAPTER_IMAGE)
  local b need=0
  for b in "${!images[@]}"; do [[ -s $(image_tar "${images[$b]}") ]] || need=1; done
  ((need)) || { log "keda images: cached in $IMAGES_DIR"; return 0; }
  have_keda_bins || die "keda v$KEDA_VERSION not built yet (ci/build-keda.sh bins)"
  local t0=$SECONDS
  bash "$here/start-dockerd.sh"
  BASE_IMG=$BASE_IMG bash "$here/build-base.sh"
  mkdir -p "$IMAGES_DIR"
  local w; w=$(mktemp -d); tmp_dirs+=("$w")
  for b in "${!images[@]}"; do
    local img=${images[$b]} tar; tar=$(image_tar "$img")
    [[ -s $tar ]] && continue
    rm -rf "${w:?}"/*; cp "$KEDA_BIN_DIR/$b" "$w/$b"
    printf 'FROM %s\nCOPY %s /%s\nUSER 65532:65532\nENTRYPOINT ["/%s"]\n' "$BASE_IMG" "$b" "$b" "$b" >"$w/Dockerfile"
    docker build -q --force-rm -t "$img" \
      --label "org.opencontainers.image.version=v$KEDA_VERSION" \
      --label "org.opencontainers.image.source=$KEDA_MODULE" "$w" >/dev/null
    docker save "$img" -o "$tar.tmp" && mv "$tar.tmp" "$tar"
    log "image $img -> $tar ($(du -h "$tar" | cut -f1))"
  done
  record_time "keda images v$KEDA_VERSION" $((SECONDS - t0))
}

main() {
  local what=${1:-all}
  mkdir -p "$CLUSTER_CACHE/bin" "$WORK" "$GOMODCACHE" "$GOCACHE"
  command -v go >/dev/null || die "go is not on PATH"
  case $what in
    bins) build_keda_bins ;;
    images) build_keda_images ;;
    all) build_keda_bins; build_keda_images ;;
    *) die "usage: $0 [bins|images|all]" ;;
  esac
}

main "$@"
