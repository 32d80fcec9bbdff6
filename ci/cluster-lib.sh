# Shared settings and helpers of the offline test cluster (sourced by ci/cluster-*.sh; not run alone).
# Every knob is an environment variable with a default; docs/cluster.md describes them.
# shellcheck shell=bash disable=SC2034  # variables used by the scripts that source this file

K8S_VERSION=${K8S_VERSION:-1.34.4}          # Kubernetes (kubelet 1.35+ refuses cgroup v1 by default)
COREDNS_VERSION=${COREDNS_VERSION:-1.12.4}  # CoreDNS, built with `go install`
# NetworkPolicy enforcement: kube-router's firewall controller alone (iptables + ipset). The Go proxy
# serves only v2.1.0; docs/cluster.md says why not kube-network-policies (no nft `queue` here).
KUBE_ROUTER_VERSION=${KUBE_ROUTER_VERSION:-2.1.0}
# etcd: by default the version the Kubernetes build pins (go.etcd.io/etcd/client/v3); ETCD_VERSION overrides.
# KEDA (autoscaling e2e): operator + metrics API server. v2.21.1 needs Go >= 1.27.4, which this
# machine cannot get (Go 1.26.8; the only newer toolchain the module proxy may give here is 1.27.3);
# v2.21.0 is the newest release that builds with Go 1.26 (docs/cluster.md).
KEDA_VERSION=${KEDA_VERSION:-2.21.0}

PYWORKER_CACHE=${PYWORKER_CACHE:-$HOME/.cache/pyworker}
CLUSTER_CACHE=${CLUSTER_CACHE:-$PYWORKER_CACHE/cluster}     # binaries, images, kubeconfig (persist)
CLUSTER_STATE=${CLUSTER_STATE:-/var/lib/pyworker-cluster}   # PKI, configs, pids, logs, etcd data (per run)
KUBECONFIG_OUT=${KUBECONFIG_OUT:-$CLUSTER_CACHE/admin.conf}  # what tests use (fixed path)
GO_CACHE_ROOT=${GO_CACHE_ROOT:-$PYWORKER_CACHE/go}

# Network: everything stays on this machine.
NODE_NAME=${NODE_NAME:-pyworker-node}
NODE_IF=k8s0                      # dummy (or empty bridge) interface that carries the node IP
NODE_IP=10.200.0.1
POD_CIDR=10.244.0.0/16
NODE_POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_IP=10.96.0.10
CNI_BRIDGE=cni0
EGRESS_NFT_TABLE=pyworker_cluster   # nftables table (inet) of the pod egress guard

# Images used by the cluster itself: local tags of images built here, never pulled.
PAUSE_IMAGE=registry.k8s.io/pause:3.10
COREDNS_IMAGE=pyworker/coredns:v$COREDNS_VERSION
BUSYBOX_IMAGE=pyworker/busybox:dev

K8S_BIN_DIR=$CLUSTER_CACHE/bin/kubernetes-v$K8S_VERSION
COREDNS_BIN_DIR=$CLUSTER_CACHE/bin/coredns-v$COREDNS_VERSION
KUBE_ROUTER_BIN=$CLUSTER_CACHE/bin/kube-router-v$KUBE_ROUTER_VERSION/kube-router
KEDA_BIN_DIR=$CLUSTER_CACHE/bin/keda-v$KEDA_VERSION    # keda-operator, keda-adapter, crds/
KEDA_OPERATOR_IMAGE=pyworker/keda-operator:v$KEDA_VERSION
KEDA_ADAPTER_IMAGE=pyworker/keda-adapter:v$KEDA_VERSION
IMAGES_DIR=$CLUSTER_CACHE/images
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

# containerd of the cluster (its own socket/root, so a dockerd's containerd is never touched)
CTRD_SOCK=/run/pyworker-cluster/containerd.sock
CTRD_ROOT=/var/lib/pyworker-cluster-containerd
CTRD_STATE=/run/pyworker-cluster/containerd
CNI_CONF_DIR=/etc/cni/net.d
CNI_CONF_FILE=$CNI_CONF_DIR/10-pyworker-bridge.conflist
CNI_BIN_DIR=/usr/lib/cni
CNI_NET_NAME=pyworker-k8s

TIMES_LOG=$CLUSTER_CACHE/timings.log   # one line per build/start/smoke, with its duration

_cl_name=$(basename "${0%.sh}")
log() { printf '[%s %s] %s\n' "$_cl_name" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# record_time WHAT SECONDS [details]: appends to $TIMES_LOG and logs
record_time() {
  mkdir -p "$(dirname "$TIMES_LOG")"
  printf '%s\t%s\t%ss\t%s\n' "$(date -u +%FT%TZ)" "$1" "$2" "${3:-}" >>"$TIMES_LOG"
  log "$1 took $2s ${3:-}"
}

# wait_for DESCRIPTION SECONDS CMD...: run CMD every second until it succeeds; fail after SECONDS.
wait_for() {
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${limit}s waiting for: $what"
      return 1
    fi
    sleep 1
  done
}

# etcd version: explicit, else recorded by the Kubernetes build
etcd_version() {
  if [[ -n ${ETCD_VERSION:-} ]]; then echo "${ETCD_VERSION#v}"; return; fi
  [[ -f $K8S_BIN_DIR/etcd-version ]] && cat "$K8S_BIN_DIR/etcd-version"
}
etcd_bin() {
  local v; v=$(etcd_version)
  if [[ -n $v && -x $CLUSTER_CACHE/bin/etcd-v$v/etcd ]]; then echo "$CLUSTER_CACHE/bin/etcd-v$v/etcd"
  elif [[ ${ETCD_FALLBACK_DEBIAN:-0} == 1 || -f $CLUSTER_CACHE/bin/etcd-use-debian ]] && [[ -x /usr/bin/etcd ]]; then echo /usr/bin/etcd
  else return 1
  fi
}

kubectl_() { "$K8S_BIN_DIR/kubectl" --kubeconfig "$CLUSTER_STATE/pki/admin.conf" "$@"; }
ctr_() { ctr --address "$CTRD_SOCK" -n k8s.io "$@"; }

# free disk, in GiB, of the file system holding $1 (or its nearest existing parent)
free_gib() {
  local d=$1
  while [[ ! -e $d ]]; do d=$(dirname "$d"); done
  df -Pk "$d" | awk 'NR==2 {print int($4/1048576)}'
}

# ---- daemons: started in the background, PID recorded, stopped by that PID only ------------------
PIDS_DIR=$CLUSTER_STATE/pids
LOGS_DIR=$CLUSTER_STATE/logs

# start_daemon NAME CMD...: run CMD detached (own session, survives this script), record "PID EXE".
start_daemon() {
  local name=$1; shift
  mkdir -p "$PIDS_DIR" "$LOGS_DIR"
  setsid nohup "$@" >>"$LOGS_DIR/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid $(readlink -f "$1")" >"$PIDS_DIR/$name"
  sleep 0.5
  if ! daemon_alive "$name"; then
    tail -n 30 "$LOGS_DIR/$name.log" >&2 || true
    die "$name exited right after start (log: $LOGS_DIR/$name.log)"
  fi
  log "started $name (pid $pid)"
}

# daemon_pid NAME: the recorded PID if that process still runs the recorded executable
daemon_pid() {
  local f=$PIDS_DIR/$1 pid exe
  [[ -f $f ]] || return 1
  read -r pid exe <"$f" || return 1
  [[ -n $pid && -d /proc/$pid ]] || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
  local cur; cur=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  cur=${cur% (deleted)}   # the binary may have been replaced or its cache wiped while it runs
  [[ $cur == "$exe" ]] || return 1
  echo "$pid"
}
daemon_alive() { daemon_pid "$1" >/dev/null; }

# stop_daemon NAME [GRACE_SECONDS]: SIGTERM the recorded PID, SIGKILL after the grace period.
stop_daemon() {
  local name=$1 grace=${2:-15} pid
  if pid=$(daemon_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while [[ -d /proc/$pid ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        log "$name (pid $pid) ignored SIGTERM for ${grace}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.2
    done
    log "stopped $name (pid $pid)"
  fi
  rm -f "$PIDS_DIR/$name"
}
