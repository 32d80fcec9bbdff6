#!/usr/bin/env bash
# Smoke test of the running test cluster, independent of the chart: a busybox httpd Deployment, a
# ClusterIP and a NodePort Service, and a client pod that resolves the service by DNS and fetches
# from it; the host fetches through the NodePort on 127.0.0.1. Prints PASS/FAIL per check and in
# total; exits non-zero on any failure. Runs in a fresh namespace pyworker-smoke-<time>, deleted afterwards
# (SMOKE_KEEP=1 keeps it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

NS=${SMOKE_NAMESPACE:-pyworker-smoke-$(date +%s)}   # fresh each run: no wait for a terminating one
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-120}
KUBECTL=$K8S_BIN_DIR/kubectl
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

fails=0
results=()
check() { # check NAME RESULT(0/1) [detail]
  if [[ $2 == 0 ]]; then results+=("PASS  $1"); printf 'PASS  %s\n' "$1"
  else results+=("FAIL  $1${3:+: $3}"); printf 'FAIL  %s%s\n' "$1" "${3:+: $3}"; fails=$((fails + 1)); fi
}

cleanup() {
  [[ ${SMOKE_KEEP:-0} == 1 ]] && { log "SMOKE_KEEP=1: namespace $NS kept"; return 0; }
  k delete namespace "$NS" --wait=false --ignore-not-found >/dev/null 2>&1 || true
}

dump_debug() {
  log "debug: objects in $NS and recent events"
  k -n "$NS" get all -o wide >&2 || true
  k -n "$NS" get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 15 >&2 || true
}

main() {
  local t0=$SECONDS
  [[ -x $KUBECTL && -f $KUBECONFIG_OUT ]] || { echo "FAIL  cluster not built/started: run 'make cluster-up'"; exit 1; }
  if [[ $(k get --raw=/readyz 2>/dev/null) != ok ]]; then
    echo "FAIL  API server does not answer at $(awk '/server:/ {print $2; exit}' "$KUBECONFIG_OUT"): run 'make cluster-up'"
    exit 1
  fi
  check "API server /readyz" 0
  local ready; ready=$(k get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
  check "node $NODE_NAME Ready" "$([[ $ready == True ]] && echo 0 || echo 1)" "Ready=$ready"

  trap cleanup EXIT
  if k get namespace "$NS" >/dev/null 2>&1; then
    k delete namespace "$NS" --timeout=60s >/dev/null 2>&1 || true
  fi
  k create namespace "$NS" >/dev/null
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsUser: 65534, runAsGroup: 65534, runAsNonRoot: true}
      containers:
      - name: httpd
        image: $BUSYBOX_IMAGE
        imagePullPolicy: Never
        args: [-c, "exec httpd -f -v -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-nodeport}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
EOF
  local rc=0
  k -n "$NS" rollout status deploy/web --timeout="${SMOKE_TIMEOUT}s" >/dev/null 2>&1 || rc=1
  check "Deployment web available (busybox httpd pod Ready)" $rc
  ((rc == 0)) || { dump_debug; summary $t0; }

  # client pod: DNS (full name and the short name through the search path) and HTTP via ClusterIP
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  securityContext: {runAsUser: 65534, runAsGroup: 65534, runAsNonRoot: true}
  containers:
  - name: client
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    args:
    - -c
    - |
      echo "== nslookup web.$NS.svc.cluster.local"; nslookup web.$NS.svc.cluster.local
      echo "== nslookup kubernetes.default"; nslookup kubernetes.default.svc.cluster.local
      echo "== wget http://web/"; timeout 10 wget -q -O - http://web/ && echo "== wget ok"   # no -T: it segfaults in Debian busybox 1.35
      exit 0
EOF
  local phase="" deadline=$((SECONDS + SMOKE_TIMEOUT))
  while ((SECONDS < deadline)); do
    phase=$(k -n "$NS" get pod client -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [[ $phase == Succeeded || $phase == Failed ]] && break
    sleep 1
  done
  check "client pod ran to completion" "$([[ $phase == Succeeded ]] && echo 0 || echo 1)" "phase=$phase"
  local out svcip
  out=$(k -n "$NS" logs client 2>&1 || true)
  svcip=$(k -n "$NS" get svc web -o jsonpath='{.spec.clusterIP}')
  sed 's/^/      | /' <<<"$out"
  check "DNS: web.$NS.svc.cluster.local -> $svcip (in a pod)" \
    "$(awk '/^== nslookup web/{f=1;next} /^==/{f=0} f' <<<"$out" | grep -q "Address:.*$svcip" && echo 0 || echo 1)"
  check "DNS: kubernetes.default -> $KUBERNETES_SVC_IP (in a pod)" \
    "$(awk '/^== nslookup kube/{f=1;next} /^==/{f=0} f' <<<"$out" | grep -q "Address:.*$KUBERNETES_SVC_IP" && echo 0 || echo 1)"
  check "HTTP via ClusterIP service name (pod -> http://web/)" \
    "$(grep -q 'pyworker cluster smoke' <<<"$out" && grep -q '== wget ok' <<<"$out" && echo 0 || echo 1)"

  local np body=""
  np=$(k -n "$NS" get svc web-nodeport -o jsonpath='{.spec.ports[0].nodePort}')
  deadline=$((SECONDS + 30))
  while ((SECONDS < deadline)); do
    body=$(curl -fsS --max-time 3 "http://127.0.0.1:$np/" 2>/dev/null || true)
    [[ $body == *"pyworker cluster smoke"* ]] && break
    sleep 1
  done
  check "NodePort from the host (http://127.0.0.1:$np/)" "$([[ $body == *"pyworker cluster smoke"* ]] && echo 0 || echo 1)"
  body=$(busybox nslookup "web.$NS.svc.cluster.local" "$DNS_IP" 2>&1 || true)
  check "DNS from the host via $DNS_IP" "$(grep -q "Address:.*$svcip" <<<"$body" && echo 0 || echo 1)"
  # traffic stays on the machine: CoreDNS has no upstream, and pod egress outside the pod range is rejected
  body=$(timeout 10 busybox nslookup example.com "$DNS_IP" 2>&1 || true)
  check "DNS has no upstream (example.com does not resolve)" "$(grep -qE 'NXDOMAIN|SERVFAIL|REFUSED|can.t find' <<<"$body" && echo 0 || echo 1)"
  check "egress guard in place (nft inet $EGRESS_NFT_TABLE rejects pods -> outside, before iptables)" \
    "$(nft list chain inet "$EGRESS_NFT_TABLE" egress 2>/dev/null | grep -qE 'hook forward priority (filter - 1|-1);' &&
       nft list chain inet "$EGRESS_NFT_TABLE" egress | grep -qF "ip saddr $POD_CIDR ip daddr != $POD_CIDR" &&
       nft list chain inet "$EGRESS_NFT_TABLE" egress | grep -q 'reject' && echo 0 || echo 1)"
  ((fails == 0)) || dump_debug
  summary $t0
}

summary() {
  local dt=$((SECONDS - $1))
  echo
  if ((fails == 0)); then
    echo "cluster-smoke: PASS (${#results[@]} checks, ${dt}s)"
    record_time "cluster smoke test (PASS)" "$dt" >/dev/null 2>&1 || true
    exit 0
  fi
  echo "cluster-smoke: FAIL ($fails of ${#results[@]} checks failed, ${dt}s) — the cluster is broken, not the chart"
  record_time "cluster smoke test (FAIL)" "$dt" >/dev/null 2>&1 || true
  exit 1
}

main "$@"
