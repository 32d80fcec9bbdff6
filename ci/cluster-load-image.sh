#!/usr/bin/env bash
# Copy images from the Docker engine into the test cluster's containerd (namespace k8s.io):
#   ci/cluster-load-image.sh pyworker/pyworker:dev pyworker/redis:dev
# = docker save IMG | ctr -n k8s.io images import -   (on the cluster's own containerd socket)
# Each image is pinned (never garbage-collected: it cannot be pulled again). Pods must use the exact
# name (docker.io/library/... for one-part names) and imagePullPolicy Never or IfNotPresent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

(($# > 0)) || die "usage: $0 IMAGE..."
daemon_alive containerd || ctr --address "$CTRD_SOCK" version >/dev/null 2>&1 || die "the cluster's containerd is not running (make cluster-up)"
timeout 20 docker info >/dev/null 2>&1 || die "no Docker engine answers (make dockerd)"
for img in "$@"; do
  [[ $img == *:* && $img != *:latest ]] || log "warning: $img has no tag or is :latest (kubelet would try to pull it)"
  docker image inspect "$img" >/dev/null 2>&1 || die "docker has no image $img"
  t0=$SECONDS
  docker save "$img" | ctr_ images import - >/dev/null
  full=$img
  [[ ${img%%/*} == *.* || ${img%%/*} == localhost* ]] || { [[ $img == */* ]] && full=docker.io/$img || full=docker.io/library/$img; }
  ctr_ images label "$full" io.cri-containerd.pinned=pinned >/dev/null
  log "loaded $full ($((SECONDS - t0))s)"
done
