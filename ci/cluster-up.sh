#!/usr/bin/env bash
# Start the offline single-node Kubernetes test cluster as host processes:
#   containerd (own socket) -> etcd -> kube-apiserver -> controller-manager, scheduler -> kubelet,
#   kube-proxy, kube-router (NetworkPolicy enforcement only) -> CoreDNS (no upstream). Waits (bounded) until the node is Ready and DNS answers,
#   then writes the admin kubeconfig to $KUBECONFIG_OUT and prints its path on stdout (last line).
# Builds whatever is missing first (ci/cluster-build.sh). Idempotent: a healthy cluster is left
# as it is; a half-started one is torn down and started again. On failure the trap tears down.
# Knobs: CLUSTER_KEEP_ON_FAILURE=1 keeps a failed cluster for debugging; UP_TIMEOUT (s) per wait.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

UP_TIMEOUT=${UP_TIMEOUT:-120}
DAEMONS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kube-router)
PKI=$CLUSTER_STATE/pki
CONF=$CLUSTER_STATE/conf
SYSCTLS=(net.ipv4.conf.all.route_localnet vm.overcommit_memory vm.panic_on_oom kernel.panic
  kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.bridge.bridge-nf-call-iptables
  net.ipv4.ip_forward)

succeeded=0
on_exit() {
  local rc=$?
  ((succeeded)) && return 0
  log "cluster-up FAILED (exit $rc)"
  local f
  for f in "$LOGS_DIR"/*.log; do
    [[ -f $f ]] || continue
    printf '\n----- last lines of %s -----\n' "$f" >&2
    tail -n 15 "$f" >&2 || true
  done
  if [[ ${CLUSTER_KEEP_ON_FAILURE:-0} == 1 ]]; then
    log "CLUSTER_KEEP_ON_FAILURE=1: leaving the processes and state ($CLUSTER_STATE) for debugging; 'make cluster-down' cleans up"
  else
    log "tearing down what was started"
    bash "$here/cluster-down.sh" || true
  fi
  exit "$rc"
}

preflight() {
  [[ $(id -u) == 0 ]] || die "must run as root (containerd, kubelet, iptables)"
  local c
  for c in containerd runc ctr iptables ip6tables ipset nft conntrack openssl ip ss curl busybox; do
    command -v "$c" >/dev/null || die "$c is missing (run ci/cluster-build.sh)"
  done
  local free; free=$(free_gib /var/lib)
  ((free >= 3)) || die "only ${free} GiB free under /var/lib; need 3"
  # Ports the cluster binds; something else on them would make a daemon fail in a confusing way.
  local p busy=()
  for p in 2379 2380 6443 10248 10249 10250 10256 10257 10259; do
    if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then busy+=("$p"); fi
  done
  ((${#busy[@]} == 0)) || die "ports already in use by something else: ${busy[*]} (ss -ltnp)"
}

cluster_healthy() {
  local d
  for d in "${DAEMONS[@]}"; do daemon_alive "$d" || return 1; done
  [[ -f $PKI/admin.conf ]] || return 1
  [[ $(kubectl_ get --raw=/readyz 2>/dev/null) == ok ]] || return 1
}

# ---- network -------------------------------------------------------------------------------------
setup_network() {
  mkdir -p "$CLUSTER_STATE"
  if ! ip link show "$NODE_IF" >/dev/null 2>&1; then
    # a dummy link; kernels without the dummy driver (this build VM) get an empty bridge instead:
    # its address is local all the same (like docker0 with no containers)
    ip link add "$NODE_IF" type dummy 2>/dev/null || ip link add "$NODE_IF" type bridge
  fi
  ip addr replace "$NODE_IP/32" dev "$NODE_IF"
  ip link set "$NODE_IF" up
  # Save host sysctls kubelet/kube-proxy change, so cluster-down restores them.
  if [[ ! -f $CLUSTER_STATE/sysctl.saved ]]; then
    local s
    for s in "${SYSCTLS[@]}"; do
      if v=$(sysctl -n "$s" 2>/dev/null); then printf '%s=%s\n' "$s" "$v"; fi
    done >"$CLUSTER_STATE/sysctl.saved"
  fi
  # nftables tables that exist now (iptables-nft creates e.g. "ip mangle" when kubelet adds a chain
  # there); cluster-down deletes the ones the cluster added, if they are empty
  [[ -f $CLUSTER_STATE/nft-tables.before ]] || { nft list tables 2>/dev/null || true; } >"$CLUSTER_STATE/nft-tables.before"
  sysctl -qw net.ipv4.ip_forward=1
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || log "warning: br_netfilter missing: pod->service->same-node pod may fail"
  mkdir -p "$CLUSTER_STATE/cni/net.d" "$CLUSTER_STATE/cni/ipam"
  # ipMasq off: pod traffic is never NATed out of the machine. Pods reach the node IP, services and
  # each other; the egress rule below rejects anything else.
  cat >"$CLUSTER_STATE/cni/net.d/10-bridge.conflist" <<EOF
{"cniVersion":"0.4.0","name":"$CNI_NET_NAME","plugins":[
 {"type":"bridge","bridge":"$CNI_BRIDGE","isGateway":true,"ipMasq":false,"hairpinMode":true,
  "ipam":{"type":"host-local","dataDir":"$CLUSTER_STATE/cni/ipam",
          "ranges":[[{"subnet":"$NODE_POD_CIDR"}]],"routes":[{"dst":"0.0.0.0/0"}]}},
 {"type":"portmap","capabilities":{"portMappings":true}},
 {"type":"firewall"},
 {"type":"loopback"}]}
EOF
  # Egress guard: reject pod traffic to any address outside the pod network (service IPs are
  # DNATed to pods before FORWARD). In an nftables table of its own, hooked before the iptables
  # filter table (priority -1 < 0): kube-router ACCEPTs the traffic NetworkPolicy allows at the top
  # of FORWARD, so a rule further down (the CNI firewall plugin's CNI-ADMIN) would never be reached.
  nft -f - <<EOF
table inet $EGRESS_NFT_TABLE
delete table inet $EGRESS_NFT_TABLE
table inet $EGRESS_NFT_TABLE {
  chain egress {
    type filter hook forward priority -1; policy accept;
    ip saddr $POD_CIDR ip daddr != $POD_CIDR counter reject comment "pyworker-cluster-egress"
  }
}
EOF
}

# ---- PKI and kubeconfigs -------------------------------------------------------------------------
mkcert() { # mkcert NAME SUBJECT EXTENSIONS
  local n=$1 subj=$2 ext=$3
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$n.key" -subj "$subj" -out "$PKI/$n.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$PKI/$n.ext"
  openssl x509 -req -in "$PKI/$n.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$PKI/$n.ext" -out "$PKI/$n.crt" 2>/dev/null
  rm -f "$PKI/$n.csr" "$PKI/$n.ext"
}

kubeconfig() { # kubeconfig NAME USER CERT SERVER
  local n=$1 user=$2 cert=$3 server=${4:-https://$NODE_IP:6443}
  cat >"$PKI/$n.conf" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: pyworker
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 "$PKI/$cert.key")
contexts:
- name: pyworker
  context: {cluster: pyworker, user: $user}
current-context: pyworker
EOF
  chmod 0600 "$PKI/$n.conf"
}

make_pki() {
  [[ -f $PKI/admin.conf ]] && return 0
  local t0=$SECONDS
  mkdir -p "$PKI"; chmod 0700 "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=pyworker-cluster-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
  local client='basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth'
  mkcert apiserver /CN=kube-apiserver "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$NODE_NAME,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,IP:$NODE_IP"
  mkcert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  mkcert admin "/O=system:masters/CN=kubernetes-admin" "$client"
  mkcert controller-manager /CN=system:kube-controller-manager "$client"
  mkcert scheduler /CN=system:kube-scheduler "$client"
  mkcert kube-proxy /CN=system:kube-proxy "$client"
  mkcert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
  mkcert kube-router /CN=system:kube-router "$client"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  kubeconfig admin kubernetes-admin admin
  kubeconfig controller-manager system:kube-controller-manager controller-manager
  kubeconfig scheduler system:kube-scheduler scheduler
  kubeconfig kube-proxy system:kube-proxy kube-proxy
  kubeconfig kubelet "system:node:$NODE_NAME" kubelet
  kubeconfig kube-router system:kube-router kube-router
  log "PKI and kubeconfigs written to $PKI ($((SECONDS - t0))s)"
}

# The aggregation layer (APIServices such as KEDA's external metrics API, which the HPA controller
# reads): kube-apiserver proves itself to an extension API server with this client certificate, and
# that server trusts the X-Remote-User/Group headers only from it. A CA of its own, as kubeadm does,
# so no other client certificate of the cluster's CA can pass those headers. Idempotent: a cluster
# made before this existed gets the files on its next start.
make_front_proxy_pki() {
  [[ -s $PKI/front-proxy-client.crt ]] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=pyworker-front-proxy-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature \
    -keyout "$PKI/front-proxy-ca.key" -out "$PKI/front-proxy-ca.crt" 2>/dev/null
  local n=front-proxy-client
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$n.key" -subj /CN=front-proxy-client -out "$PKI/$n.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$PKI/$n.ext"
  openssl x509 -req -in "$PKI/$n.csr" -CA "$PKI/front-proxy-ca.crt" -CAkey "$PKI/front-proxy-ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$PKI/$n.ext" -out "$PKI/$n.crt" 2>/dev/null
  rm -f "$PKI/$n.csr" "$PKI/$n.ext"
  log "front-proxy CA and client certificate (aggregation layer) written to $PKI"
}

# An API server started by an older version of this script lacks the aggregation flags: restart it
# alone (its state is in etcd; pods keep running; clients see a few seconds without an API server).
restart_apiserver_without_aggregation() {
  local pid; pid=$(daemon_pid kube-apiserver) || return 0
  tr '\0' '\n' <"/proc/$pid/cmdline" | grep -q -- '^--proxy-client-cert-file=' && return 0
  log "kube-apiserver runs without the aggregation layer: restarting it with it"
  stop_daemon kube-apiserver
}

# ---- daemons -------------------------------------------------------------------------------------
start_containerd() {
  daemon_alive containerd && return 0
  mkdir -p "$CONF" "$CTRD_ROOT" "$CTRD_STATE" "$(dirname "$CTRD_SOCK")"
  cat >"$CONF/containerd.toml" <<EOF
version = 2
root = "$CTRD_ROOT"
state = "$CTRD_STATE"
oom_score = 0
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  tolerate_missing_hugepages_controller = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$CLUSTER_STATE/cni/net.d"
EOF
  start_daemon containerd "$(command -v containerd)" --config "$CONF/containerd.toml"
  wait_for "containerd socket" 30 ctr --address "$CTRD_SOCK" version
}

load_cluster_images() {
  local img tar present
  present=$(ctr_ images ls -q 2>/dev/null || true)
  for img in "$PAUSE_IMAGE" "$COREDNS_IMAGE" "$BUSYBOX_IMAGE"; do
    local full=$img
    [[ $full == */*/* || $full == *.*/* ]] || full=docker.io/$full
    grep -qxF "$full" <<<"$present" && continue
    tar="$IMAGES_DIR/$(echo "$img" | tr '/:' '__').tar"
    [[ -s $tar ]] || die "image tarball $tar missing (ci/cluster-build.sh images)"
    ctr_ images import "$tar" >/dev/null
    ctr_ images label "$full" io.cri-containerd.pinned=pinned >/dev/null
    log "imported $full"
  done
}

start_etcd() {
  daemon_alive etcd && return 0
  local bin; bin=$(etcd_bin) || die "no etcd binary (ci/cluster-build.sh)"
  local extra=()
  "$bin" --help 2>&1 | grep -q -- '--unsafe-no-fsync' && extra+=(--unsafe-no-fsync)
  mkdir -p "$CLUSTER_STATE/etcd"; chmod 0700 "$CLUSTER_STATE/etcd"
  start_daemon etcd "$bin" --name default --data-dir "$CLUSTER_STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --listen-metrics-urls '' --log-level warn "${extra[@]}"
  wait_for "etcd health" "$UP_TIMEOUT" sh -c 'curl -fsS http://127.0.0.1:2379/health | grep -q "\"health\":\"true\""'
}

start_control_plane() {
  local B=$K8S_BIN_DIR
  daemon_alive kube-apiserver || start_daemon kube-apiserver "$B/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port=6443 \
    --service-cluster-ip-range="$SERVICE_CIDR" --service-node-port-range=30000-32767 \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --profiling=false
  wait_for "kube-apiserver /readyz" "$UP_TIMEOUT" sh -c '[ "$('"$B"'/kubectl --kubeconfig '"$PKI"'/admin.conf get --raw=/readyz 2>/dev/null)" = ok ]'
  log "kube-apiserver ready"
  daemon_alive kube-controller-manager || start_daemon kube-controller-manager "$B/kube-controller-manager" \
    --kubeconfig="$PKI/controller-manager.conf" \
    --authentication-kubeconfig="$PKI/controller-manager.conf" --authorization-kubeconfig="$PKI/controller-manager.conf" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" --use-service-account-credentials=true \
    --allocate-node-cidrs=true --cluster-cidr="$POD_CIDR" --node-cidr-mask-size=24 \
    --service-cluster-ip-range="$SERVICE_CIDR" --leader-elect=false --bind-address=127.0.0.1 --profiling=false
  daemon_alive kube-scheduler || start_daemon kube-scheduler "$B/kube-scheduler" \
    --kubeconfig="$PKI/scheduler.conf" --authentication-kubeconfig="$PKI/scheduler.conf" \
    --authorization-kubeconfig="$PKI/scheduler.conf" --leader-elect=false --bind-address=127.0.0.1 --profiling=false
}

# write_conf FILE < content: replace FILE only when the content differs (kube-proxy exits when its
# config file is written to, even with the same content)
write_conf() {
  local f=$1 tmp; tmp=$(mktemp "$f.XXXX")
  cat >"$tmp"
  if cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv "$tmp" "$f"; fi
}

start_node() {
  local B=$K8S_BIN_DIR
  mkdir -p "$CONF" "$CLUSTER_STATE/kubelet"
  # kubelet writes container logs to /var/log/pods and /var/log/containers (fixed paths): remember
  # whether they existed, so cluster-down removes them only if the cluster created them.
  [[ -e /var/log/pods || -f $CLUSTER_STATE/varlog-created ]] || touch "$CLUSTER_STATE/varlog-created"
  : >"$CONF/resolv.conf"   # no host name servers: nothing in the cluster resolves outside names
  write_conf "$CONF/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: 127.0.0.1
containerRuntimeEndpoint: unix://$CTRD_SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: $CONF/resolv.conf
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $PKI/ca.crt}}
authorization: {mode: Webhook}
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
EOF
  daemon_alive kubelet || start_daemon kubelet "$B/kubelet" --config="$CONF/kubelet.yaml" \
    --kubeconfig="$PKI/kubelet.conf" --node-ip="$NODE_IP" --hostname-override="$NODE_NAME" \
    --root-dir="$CLUSTER_STATE/kubelet" --cert-dir="$CLUSTER_STATE/kubelet/pki"
  write_conf "$CONF/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.conf}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [127.0.0.0/8, $NODE_IP/32]
oomScoreAdj: 0
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  daemon_alive kube-proxy || start_daemon kube-proxy "$B/kube-proxy" --config="$CONF/kube-proxy.yaml"
  wait_for "node $NODE_NAME Ready" "$UP_TIMEOUT" sh -c \
    "[ \"\$($B/kubectl --kubeconfig $PKI/admin.conf get node $NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' 2>/dev/null)\" = True ]"
  log "node $NODE_NAME Ready"
}

# kube-router with only its firewall controller: it enforces NetworkPolicy with iptables chains
# (KUBE-ROUTER-*, KUBE-POD-FW-*, KUBE-NWPLCY-*) and ipsets (KUBE-SRC-*, KUBE-DST-*) on the pods of
# this node; routing and service proxying stay with the bridge CNI and kube-proxy.
start_kube_router() {
  daemon_alive kube-router && return 0
  [[ -x $KUBE_ROUTER_BIN ]] || die "no kube-router binary (ci/cluster-build.sh)"
  # its informers watch these (services/endpoints too, although only the firewall runs)
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:kube-router"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services, nodes, endpoints]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kube-router"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-router"}]
EOF
  # health and metrics servers off: they would listen on every host address
  start_daemon kube-router "$KUBE_ROUTER_BIN" --kubeconfig="$PKI/kube-router.conf" \
    --hostname-override="$NODE_NAME" --run-firewall=true --run-router=false --run-service-proxy=false \
    --enable-cni=false --service-cluster-ip-range="$SERVICE_CIDR" --service-node-port-range=30000-32767 \
    --health-port=0 --metrics-port=0
  wait_for "kube-router's NetworkPolicy chains in FORWARD" "$UP_TIMEOUT" sh -c \
    'iptables -S FORWARD | grep -q -- "-j KUBE-ROUTER-FORWARD"'
  log "kube-router enforces NetworkPolicy"
}

deploy_coredns() {
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  # No forward/upstream: names outside cluster.local get NXDOMAIN/SERVFAIL, no query leaves the machine.
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        livenessProbe: {httpGet: {path: /health, port: 8080}, initialDelaySeconds: 10}
        resources: {requests: {cpu: 50m, memory: 40Mi}, limits: {memory: 170Mi}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes:
      - name: config
        configMap: {name: coredns, items: [{key: Corefile, path: Corefile}]}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
  kubectl_ -n kube-system rollout status deploy/coredns --timeout="${UP_TIMEOUT}s" >/dev/null
  # DNS through the service IP, from the host (kube-proxy DNATs to the CoreDNS pod)
  wait_for "DNS answers on $DNS_IP" "$UP_TIMEOUT" sh -c \
    "busybox nslookup kubernetes.default.svc.cluster.local $DNS_IP | grep -q 'Address:.*$KUBERNETES_SVC_IP'"
  log "CoreDNS answers: kubernetes.default.svc.cluster.local -> $KUBERNETES_SVC_IP"
}

write_outputs() {
  mkdir -p "$(dirname "$KUBECONFIG_OUT")"
  install -m 0600 "$PKI/admin.conf" "$KUBECONFIG_OUT"
  ln -sfn "$K8S_BIN_DIR/kubectl" "$CLUSTER_CACHE/bin/kubectl"
}

main() {
  local t0=$SECONDS
  mkdir -p "$CLUSTER_STATE" "$PIDS_DIR" "$LOGS_DIR"
  if cluster_healthy; then
    log "cluster already running; checking node and DNS"
    trap on_exit EXIT
    succeeded=1   # a healthy cluster is never torn down by a failing re-check
    make_front_proxy_pki
    restart_apiserver_without_aggregation
    start_control_plane
    start_node
    start_kube_router
    deploy_coredns
    write_outputs
    echo "$KUBECONFIG_OUT"
    return 0
  fi
  if ls "$PIDS_DIR"/* >/dev/null 2>&1 || ip link show "$NODE_IF" >/dev/null 2>&1; then
    log "found a partly running or stale cluster: tearing it down first"
    bash "$here/cluster-down.sh"
    mkdir -p "$CLUSTER_STATE" "$PIDS_DIR" "$LOGS_DIR"
  fi
  local tb=$SECONDS
  bash "$here/cluster-build.sh" all
  log "build check done ($((SECONDS - tb))s)"
  trap on_exit EXIT
  local ts=$SECONDS
  preflight
  setup_network
  make_pki
  make_front_proxy_pki
  start_containerd
  load_cluster_images
  start_etcd
  start_control_plane
  start_node
  start_kube_router
  deploy_coredns
  write_outputs
  succeeded=1
  record_time "cluster start (warm: containerd -> Ready + DNS)" $((SECONDS - ts))
  log "cluster up in $((SECONDS - t0))s. kubectl: $CLUSTER_CACHE/bin/kubectl; kubeconfig (also: make -s cluster-kubeconfig):"
  echo "$KUBECONFIG_OUT"
}

main "$@"
