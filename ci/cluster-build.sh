#!/usr/bin/env bash
# Build what the offline test cluster needs, skipping whatever is already cached (keyed by version):
#   - Debian packages: containerd runc containernetworking-plugins iptables conntrack openssl busybox-static gcc
#   - Kubernetes v$K8S_VERSION (6 binaries) through a wrapper module with the staging `replace`s
#   - etcd (the version the Kubernetes build pins) through its own wrapper module
#   - CoreDNS v$COREDNS_VERSION (go install)
#   - kube-router v$KUBE_ROUTER_VERSION (NetworkPolicy enforcement) through a wrapper module
#   - KEDA v$KEDA_VERSION (operator, metrics API server, CRDs; its images) by ci/build-keda.sh
#   - image tarballs: pause (static C), CoreDNS, busybox (Debian's busybox-static)
# Binaries land in $CLUSTER_CACHE/bin/<name>-v<version>/, Go caches in $GO_CACHE_ROOT (GOMODCACHE, GOCACHE).
# Each build's duration goes to $CLUSTER_CACHE/timings.log. Usage: ci/cluster-build.sh [bins|images|all]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

MIN_FREE_GIB=${MIN_FREE_GIB:-14}
APT_PACKAGES=(containerd runc containernetworking-plugins iptables ipset nftables conntrack openssl busybox-static gcc libc6-dev)

export GOMODCACHE=$GO_CACHE_ROOT/mod GOCACHE=$GO_CACHE_ROOT/build
export GOFLAGS="-modcacherw -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0
WORK=$CLUSTER_CACHE/work   # wrapper modules (kept: small, and `go build` in them is incremental)
tmp_dirs=()
side_pid=
keda_pid=
cleanup() {
  local d
  [[ -n $side_pid ]] && kill -- "$side_pid" 2>/dev/null || true   # the background etcd/coredns build
  [[ -n $keda_pid ]] && kill -- "$keda_pid" 2>/dev/null || true   # the background KEDA build
  for d in "${tmp_dirs[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT

ensure_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing Debian packages: ${missing[*]}"
  local t0=$SECONDS
  apt-get update -q >/dev/null
  NEEDRESTART_SUSPEND=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  record_time "apt ${missing[*]}" $((SECONDS - t0))
}

check_disk() {
  local free; free=$(free_gib "$CLUSTER_CACHE")
  log "free disk at $CLUSTER_CACHE: ${free} GiB (need ${MIN_FREE_GIB})"
  ((free >= MIN_FREE_GIB)) || die "not enough free disk: ${free} GiB < ${MIN_FREE_GIB} GiB (a cold build needs ~13 GiB: ~7 for Kubernetes and the rest, ~6 for KEDA)"
}

have_k8s() { local b; for b in "${K8S_BINARIES[@]}"; do [[ -x $K8S_BIN_DIR/$b ]] || return 1; done; [[ -s $K8S_BIN_DIR/etcd-version ]]; }

build_k8s() {
  if have_k8s; then log "kubernetes v$K8S_VERSION: cached in $K8S_BIN_DIR"; return 0; fi
  local V=$K8S_VERSION S=0.${K8S_VERSION#1.} dir=$WORK/kubernetes-v$K8S_VERSION t0=$SECONDS gomod
  log "kubernetes v$V: downloading the module (go mod download)"
  gomod=$(go mod download -json "k8s.io/kubernetes@v$V" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  mkdir -p "$dir"
  (
    cd "$dir"
    rm -f go.mod go.sum
    printf 'module offline.local/k8s-build\n\n%s\n%s\n' "$(grep -m1 '^go ' "$gomod")" "$(grep '^godebug' "$gomod" || true)" >go.mod
    go mod edit -require="k8s.io/kubernetes@v$V"
    local m n=0
    for m in $(grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | cut -d' ' -f1); do
      go mod edit -replace="$m=$m@v$S"; n=$((n + 1))
    done
    log "kubernetes v$V: $n staging modules replaced by their v$S releases"
    cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
    log "kubernetes v$V: go mod tidy (downloads the dependencies)"
    go mod tidy
  )
  record_time "kubernetes-v$V modules" $((SECONDS - t0)) "(download + tidy; GOMODCACHE $(du -sh "$GOMODCACHE" | cut -f1))"
  local ldf="-s -w" p minor; minor=$(echo "$V" | cut -d. -f2)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=v$V -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%FT%TZ)"
  done
  local out; out=$(mktemp -d "$CLUSTER_CACHE/bin/.k8s.XXXX"); tmp_dirs+=("$out")
  local b t1
  # One binary at a time so each duration is logged; the compile cache is shared, so the first
  # (kube-apiserver) carries most of the cost.
  for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl; do
    t1=$SECONDS
    log "kubernetes v$V: building $b"
    (cd "$dir" && go build -trimpath -ldflags "$ldf" -o "$out/$b" "k8s.io/kubernetes/cmd/$b")
    record_time "$b v$V" $((SECONDS - t1)) "($(du -h "$out/$b" | cut -f1))"
  done
  (cd "$dir" && go list -m -f '{{.Version}}' go.etcd.io/etcd/client/v3) | sed 's/^v//' >"$out/etcd-version"
  rm -rf "$K8S_BIN_DIR"; mkdir -p "$(dirname "$K8S_BIN_DIR")"; mv "$out" "$K8S_BIN_DIR"; chmod 0755 "$K8S_BIN_DIR"
  record_time "kubernetes-v$V total" $((SECONDS - t0))
}

build_etcd() {
  local E; E=$(etcd_version) || true
  [[ -n $E ]] || die "etcd version unknown (build Kubernetes first or set ETCD_VERSION)"
  local bin=$CLUSTER_CACHE/bin/etcd-v$E/etcd
  if [[ -x $bin ]]; then log "etcd v$E: cached"; return 0; fi
  local dir=$WORK/etcd-v$E t0=$SECONDS
  log "etcd v$E: building through a wrapper module"
  if ! (
    mkdir -p "$dir" && cd "$dir" && rm -f go.mod go.sum
    go mod init offline.local/etcd-build 2>/dev/null
    go mod edit -require="go.etcd.io/etcd/server/v3@v$E"
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >tools.go
    go mod tidy
    mkdir -p "$(dirname "$bin")"
    go build -trimpath -ldflags "-s -w" -o "$bin.tmp" go.etcd.io/etcd/server/v3 && mv "$bin.tmp" "$bin"
  ); then
    log "etcd v$E: build FAILED; falling back to Debian's etcd-server"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server >/dev/null
    touch "$CLUSTER_CACHE/bin/etcd-use-debian"
    return 0
  fi
  record_time "etcd v$E" $((SECONDS - t0)) "($(du -h "$bin" | cut -f1))"
}

build_coredns() {
  local bin=$COREDNS_BIN_DIR/coredns
  if [[ -x $bin ]]; then log "coredns v$COREDNS_VERSION: cached"; return 0; fi
  local t0=$SECONDS
  log "coredns v$COREDNS_VERSION: go install"
  mkdir -p "$COREDNS_BIN_DIR"
  GOBIN=$COREDNS_BIN_DIR go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@v$COREDNS_VERSION"
  record_time "coredns v$COREDNS_VERSION" $((SECONDS - t0)) "($(du -h "$bin" | cut -f1))"
}

# kube-router v2.1.0 (the only version the module proxy serves) requires dependencies with published
# vulnerabilities (golang.org/x/net, grpc, ...): the wrapper module raises them to these fixed
# releases, which it builds and runs with (its firewall controller is all the cluster uses).
KUBE_ROUTER_DEP_BUMPS=(golang.org/x/net@v0.63.0 golang.org/x/sys@v0.50.0 golang.org/x/text@v0.44.0
  golang.org/x/oauth2@v0.38.0 google.golang.org/grpc@v1.85.0 google.golang.org/protobuf@v1.36.12)

build_kube_router() {
  local bin=$KUBE_ROUTER_BIN
  if [[ -x $bin ]]; then log "kube-router v$KUBE_ROUTER_VERSION: cached"; return 0; fi
  local dir=$WORK/kube-router-v$KUBE_ROUTER_VERSION t0=$SECONDS
  log "kube-router v$KUBE_ROUTER_VERSION: module download + tidy through a wrapper module"
  mkdir -p "$dir" "$(dirname "$bin")"
  (
    cd "$dir" && rm -f go.mod go.sum
    go mod init offline.local/kube-router-build 2>/dev/null
    go mod edit -require="github.com/cloudnativelabs/kube-router/v2@v$KUBE_ROUTER_VERSION"
    printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"\n' >tools.go
    go mod tidy
    go get "${KUBE_ROUTER_DEP_BUMPS[@]}"
    go mod tidy
    log "kube-router v$KUBE_ROUTER_VERSION: modules ready ($((SECONDS - t0))s); compiling"
    go build -trimpath -ldflags "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=v$KUBE_ROUTER_VERSION" \
      -o "$bin.tmp" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
  )
  mv "$bin.tmp" "$bin"
  record_time "kube-router v$KUBE_ROUTER_VERSION" $((SECONDS - t0)) "($(du -h "$bin" | cut -f1))"
}

# ---- images: one-file (or few-file) root file systems -> docker import -> docker save tarball --------
# The tarballs are cached, so starting the cluster never needs a Docker engine.
image_tar() { echo "$IMAGES_DIR/$(echo "$1" | tr '/:' '__').tar"; }

make_image() { # make_image NAME ROOTFS_DIR ENTRYPOINT_JSON
  local name=$1 root=$2 ep=$3 tar; tar=$(image_tar "$name")
  tar --numeric-owner -C "$root" -c . | docker import -c "ENTRYPOINT $ep" - "$name" >/dev/null
  docker save "$name" -o "$tar.tmp" && mv "$tar.tmp" "$tar"
  log "image $name -> $tar ($(du -h "$tar" | cut -f1))"
}

build_images() {
  mkdir -p "$IMAGES_DIR"
  local need=0 i
  for i in "$PAUSE_IMAGE" "$COREDNS_IMAGE" "$BUSYBOX_IMAGE"; do [[ -s $(image_tar "$i") ]] || need=1; done
  ((need)) || { log "images: cached in $IMAGES_DIR"; return 0; }
  local t0=$SECONDS
  if [[ -x $here/start-dockerd.sh ]] || [[ -f $here/start-dockerd.sh ]]; then bash "$here/start-dockerd.sh"; fi
  timeout 20 docker info >/dev/null 2>&1 || die "no Docker engine answers (needed once to build the cluster's images)"
  local w; w=$(mktemp -d); tmp_dirs+=("$w")
  if [[ ! -s $(image_tar "$PAUSE_IMAGE") ]]; then
    mkdir -p "$w/pause"
    cat >"$w/pause.c" <<'C'
/* pause: the pod sandbox's PID 1. Sleeps until SIGINT/SIGTERM, reaps orphaned children. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void on_term(int s) { (void)s; _exit(0); }
static void on_chld(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction t = {0}, c = {0};
  t.sa_handler = on_term; sigaction(SIGINT, &t, NULL); sigaction(SIGTERM, &t, NULL);
  c.sa_handler = on_chld; c.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &c, NULL);
  for (;;) pause();
}
C
    gcc -static -Os -s -o "$w/pause/pause" "$w/pause.c"
    make_image "$PAUSE_IMAGE" "$w/pause" '["/pause"]'
  fi
  if [[ ! -s $(image_tar "$BUSYBOX_IMAGE") ]]; then
    # busybox + its applet links; /etc/passwd,group so `id`/httpd work; /tmp for wget -O
    local r=$w/busybox a
    mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/www"; chmod 1777 "$r/tmp"
    cp /bin/busybox "$r/bin/busybox"
    for a in $("$r/bin/busybox" --list); do [[ $a == busybox ]] || ln -sf busybox "$r/bin/$a"; done
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
    echo 'pyworker cluster smoke' >"$r/www/index.html"
    make_image "$BUSYBOX_IMAGE" "$r" '["/bin/sh"]'
  fi
  if [[ ! -s $(image_tar "$COREDNS_IMAGE") ]]; then
    [[ -x $COREDNS_BIN_DIR/coredns ]] || die "coredns v$COREDNS_VERSION not built yet (ci/cluster-build.sh bins)"
    mkdir -p "$w/coredns"
    cp "$COREDNS_BIN_DIR/coredns" "$w/coredns/coredns"
    make_image "$COREDNS_IMAGE" "$w/coredns" '["/coredns"]'
  fi
  record_time "images (pause, coredns, busybox)" $((SECONDS - t0))
}

main() {
  local what=${1:-all} t0=$SECONDS
  mkdir -p "$CLUSTER_CACHE/bin" "$WORK" "$GOMODCACHE" "$GOCACHE"
  check_disk
  ensure_packages
  command -v go >/dev/null || die "go is not on PATH"
  log "go: $(go version | cut -d' ' -f3-); GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE"
  if [[ $what == all || $what == bins ]]; then
    # KEDA (only for the autoscaling e2e) has nothing in common with the rest: it builds next to
    # all of it (a no-op when cached), and only its failure is reported at the end.
    local keda_log=$CLUSTER_CACHE/build-keda.log
    if [[ ${CLUSTER_BUILD_PARALLEL:-1} == 1 ]]; then
      bash "$here/build-keda.sh" bins >"$keda_log" 2>&1 &
      keda_pid=$!
    fi
    if [[ ${CLUSTER_BUILD_PARALLEL:-1} == 1 ]] && ! { have_k8s && etcd_bin >/dev/null && [[ -x $COREDNS_BIN_DIR/coredns && -x $KUBE_ROUTER_BIN ]]; }; then
      # etcd + CoreDNS + kube-router build next to Kubernetes (the long pole): on 2 shared cores
      # this took the cold wall time from ~42 to ~26 minutes. etcd's version comes from Kubernetes' go.mod.
      if [[ -z $(etcd_version) ]]; then
        local gomod
        gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
        ETCD_VERSION=$(awk '$1 == "go.etcd.io/etcd/client/v3" {sub(/^v/, "", $2); print $2; exit}' "$gomod")
        [[ -n $ETCD_VERSION ]] || die "cannot read etcd's version from $gomod"
        export ETCD_VERSION
      fi
      local side_log=$CLUSTER_CACHE/build-etcd-coredns.log
      log "etcd v$(etcd_version), coredns v$COREDNS_VERSION and kube-router v$KUBE_ROUTER_VERSION build in the background (log: $side_log)"
      (build_etcd && build_coredns && build_kube_router) >"$side_log" 2>&1 &
      side_pid=$!
      build_k8s
      if ! wait "$side_pid"; then side_pid=; tail -n 30 "$side_log" >&2; die "etcd/coredns/kube-router build failed (log: $side_log)"; fi
      side_pid=
      grep -E 'took|cached|FAILED' "$side_log" >&2 || true
    else
      build_k8s
      build_etcd
      build_coredns
      build_kube_router
    fi
    if [[ -n $keda_pid ]]; then
      if ! wait "$keda_pid"; then keda_pid=; tail -n 30 "$keda_log" >&2; die "KEDA build failed (log: $keda_log)"; fi
      keda_pid=
      grep -E 'took|cached' "$keda_log" >&2 || true
    else
      bash "$here/build-keda.sh" bins
    fi
  fi
  if [[ $what == all || $what == images ]]; then
    build_images
    bash "$here/build-keda.sh" images
  fi
  log "done in $((SECONDS - t0))s: kubernetes v$K8S_VERSION, etcd $(etcd_bin || echo '?'), coredns v$COREDNS_VERSION, kube-router v$KUBE_ROUTER_VERSION, keda v$KEDA_VERSION"
}

main "$@"
