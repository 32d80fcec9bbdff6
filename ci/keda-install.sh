#!/usr/bin/env bash
# Install KEDA v$KEDA_VERSION on the running offline test cluster (idempotent; `make keda-up`):
#   build what is missing (ci/build-keda.sh), import its images into the cluster's containerd, apply
#   its CRDs and manifests (namespace keda, RBAC, Services, APIService v1beta1.external.metrics.k8s.io)
#   and our Deployments (ci/keda/deployments.yaml), then wait, bounded, until the operator is ready
#   and the external metrics API answers.
#   ci/keda-install.sh          install or update, then wait
#   ci/keda-install.sh remove   delete it all (ScaledObjects of every namespace go with the CRDs)
# KEDA_WAIT (seconds, default 240) bounds the wait.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

KEDA_WAIT=${KEDA_WAIT:-240}
APISERVICE=v1beta1.external.metrics.k8s.io
k() { "$K8S_BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

check_cluster() {
  [[ -x $K8S_BIN_DIR/kubectl && -s $KUBECONFIG_OUT ]] || die "no cluster: start it with make cluster-up"
  [[ $(k get --raw=/readyz 2>/dev/null) == ok ]] || die "the cluster's API server does not answer: make cluster-up"
  # KEDA's metrics API is an aggregated API: without the aggregation layer the HPA controller can
  # never read it (workers would go 0 -> 1 and no further).
  [[ -n $(k -n kube-system get configmap extension-apiserver-authentication \
    -o jsonpath='{.data.requestheader-client-ca-file}' 2>/dev/null) ]] \
    || die "the cluster's kube-apiserver runs without the aggregation layer, which KEDA's metrics API needs: make cluster-up restarts it with it"
}

image_tar() { echo "$IMAGES_DIR/$(echo "$1" | tr '/:' '__').tar"; }

import_images() {
  local present img full
  present=$(ctr_ images ls -q 2>/dev/null) || die "cannot reach the cluster's containerd at $CTRD_SOCK (run as root)"
  for img in "$KEDA_OPERATOR_IMAGE" "$KEDA_ADAPTER_IMAGE"; do
    full=docker.io/$img
    grep -qxF "$full" <<<"$present" && continue
    ctr_ images import "$(image_tar "$img")" >/dev/null
    ctr_ images label "$full" io.cri-containerd.pinned=pinned >/dev/null
    log "imported $full"
  done
}

deployments() {
  sed -e "s|@KEDA_VERSION@|$KEDA_VERSION|g" -e "s|@OPERATOR_IMAGE@|$KEDA_OPERATOR_IMAGE|g" \
    -e "s|@ADAPTER_IMAGE@|$KEDA_ADAPTER_IMAGE|g" "$here/keda/deployments.yaml"
}

apiservice_available() {
  [[ $(k get apiservice "$APISERVICE" -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null) == True ]] \
    && k get --raw "/apis/external.metrics.k8s.io/v1beta1" >/dev/null 2>&1
}

# wait_ready: bounded, with one progress line whenever what we wait for changes
wait_ready() {
  local deadline=$((SECONDS + KEDA_WAIT)) last= now
  while :; do
    local op ad api
    op=$(k -n keda get deploy keda-operator -o jsonpath='{.status.readyReplicas}' 2>/dev/null || true)
    ad=$(k -n keda get deploy keda-metrics-apiserver -o jsonpath='{.status.readyReplicas}' 2>/dev/null || true)
    api=no; apiservice_available && api=yes
    now="operator ready ${op:-0}/1, metrics API server ready ${ad:-0}/1, $APISERVICE available: $api"
    [[ $now == "$last" ]] || log "waiting: $now"
    last=$now
    [[ ${op:-0} -ge 1 && ${ad:-0} -ge 1 && $api == yes ]] && return 0
    if ((SECONDS >= deadline)); then
      k -n keda get pods -o wide >&2 || true
      k -n keda get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 15 >&2 || true
      die "KEDA not ready after ${KEDA_WAIT}s ($now); logs: kubectl -n keda logs deploy/keda-operator"
    fi
    sleep 2
  done
}

install() {
  local t0=$SECONDS
  check_cluster
  bash "$here/build-keda.sh" all
  import_images
  # Server-side apply: KEDA's CRDs are too large for the last-applied annotation of a client-side apply.
  k apply --server-side --force-conflicts --field-manager=pyworker-ci -f "$KEDA_BIN_DIR/crds/" >/dev/null
  k wait --for=condition=Established --timeout=60s -f "$KEDA_BIN_DIR/crds/" >/dev/null
  k apply --server-side --force-conflicts --field-manager=pyworker-ci -f "$KEDA_BIN_DIR/manifests/general-namespace.yaml" >/dev/null
  k apply --server-side --force-conflicts --field-manager=pyworker-ci -f "$KEDA_BIN_DIR/manifests/" >/dev/null
  deployments | k apply --server-side --force-conflicts --field-manager=pyworker-ci -f - >/dev/null
  log "applied KEDA v$KEDA_VERSION (CRDs, RBAC, Services, APIService, Deployments)"
  wait_ready
  record_time "keda install v$KEDA_VERSION (apply -> ready)" $((SECONDS - t0))
}

remove() {
  check_cluster
  deployments | k delete --ignore-not-found -f - >/dev/null
  k delete --ignore-not-found -f "$KEDA_BIN_DIR/manifests/" >/dev/null
  k delete --ignore-not-found -f "$KEDA_BIN_DIR/crds/" >/dev/null
  log "KEDA removed"
}

case ${1:-install} in
  install) install ;;
  remove) remove ;;
  *) die "usage: $0 [install|remove]" ;;
esac
