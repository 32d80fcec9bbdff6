#!/usr/bin/env bash
# Stop the offline test cluster and remove every trace of it from the host: processes (by recorded
# PID; container shims by their containerd socket), pod network namespaces, the cni0 bridge and the
# k8s0 dummy interface, the KUBE-*/CNI-* iptables chains, kube-router's KUBE-* ipsets, the egress
# guard's nftables table, mounts under the state directories, and the host sysctls
# kubelet/kube-proxy changed (restored). Safe to run when nothing runs.
# Keeps the build cache and the image store; PURGE=1 also deletes the image store.
# Ends with a check and exits non-zero if anything of the cluster is left behind.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/cluster-lib.sh
source "$here/cluster-lib.sh"

[[ $(id -u) == 0 ]] || die "must run as root"

# PIDs of processes whose command line names our containerd socket (shims: runc-v2 of the cluster)
shim_pids() {
  local f pid
  for f in $(grep -lsF -- "-address" /proc/[0-9]*/cmdline 2>/dev/null); do
    pid=${f#/proc/}; pid=${pid%/cmdline}
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == *containerd-shim* ]] || continue
    { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -qF -- "-address $CTRD_SOCK " && echo "$pid"
  done
  return 0
}

stop_containers() {
  daemon_alive containerd || return 0
  local ids id deadline
  ids=$(ctr_ tasks ls -q 2>/dev/null || true)
  if [[ -n $ids ]]; then
    log "killing $(wc -w <<<"$ids") containers"
    for id in $ids; do ctr_ tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)) && ctr_ tasks ls 2>/dev/null | grep -qE '\s(RUNNING|PAUSED|PAUSING|STOPPING)\s*$'; do sleep 0.5; done
    for id in $ids; do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
  fi
  ids=$(ctr_ containers ls -q 2>/dev/null || true)
  for id in $ids; do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
}

kill_shims() {
  local pids pid deadline
  pids=$(shim_pids)
  [[ -n $pids ]] || return 0
  log "stopping leftover shims: $pids"
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + 10))
  while [[ -n $(shim_pids) ]] && ((SECONDS < deadline)); do sleep 0.5; done
  for pid in $(shim_pids); do kill -KILL "$pid" 2>/dev/null || true; done
}

# mount points under our directories, deepest first
our_mounts() {
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    m=$(printf '%b' "${m//\\/\\0}")   # mountinfo escapes spaces as \040
    case $m in
      "$CLUSTER_STATE"/* | "$CLUSTER_STATE" | "$CTRD_ROOT"/* | "$CTRD_STATE"/* | /run/pyworker-cluster/*) echo "$m" ;;
    esac
  done | sort -r | uniq
}

unmount_all() {
  local m n=0
  for _ in 1 2 3; do
    while read -r m; do
      [[ -n $m ]] || continue
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      n=$((n + 1))
    done < <(our_mounts)
    [[ -z $(our_mounts) ]] && break
  done
  ((n == 0)) || log "unmounted $n mounts"
}

remove_netns() {
  local f
  # pod network namespaces: under containerd's state dir (netns_mounts_under_state_dir) ...
  for f in "$CTRD_STATE"/netns/*; do
    [[ -e $f ]] || continue
    umount "$f" 2>/dev/null || umount -l "$f" 2>/dev/null || true
    rm -f "$f"
  done
  # ... or, with older containerd, /run/netns/cni-*: only those holding an address of our pod range
  local n pfx=${NODE_POD_CIDR%.*}.
  for f in /run/netns/cni-*; do
    [[ -e $f ]] || continue
    n=$(basename "$f")
    if ip netns exec "$n" ip -4 -o addr show 2>/dev/null | grep -qF " inet $pfx"; then
      ip netns delete "$n" 2>/dev/null || true
    fi
  done
}

# delete every KUBE-* and CNI-* chain (and the rules that jump to them) in iptables and ip6tables
sweep_iptables() {
  local ipt table rule chain
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in filter nat mangle raw; do
      "$ipt" -t "$table" -S >/dev/null 2>&1 || continue
      # rules in any chain that jump to one of ours
      while read -r rule; do
        [[ -n $rule ]] || continue
        eval "$ipt -t $table ${rule/-A /-D }" 2>/dev/null || true
      done < <("$ipt" -t "$table" -S | grep -E '^-A ' | grep -E -- '-j (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-')
      for chain in $("$ipt" -t "$table" -S | awk '/^-N (KUBE|CNI)-/ {print $2}'); do
        "$ipt" -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$ipt" -t "$table" -S | awk '/^-N (KUBE|CNI)-/ {print $2}'); do
        "$ipt" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

# kube-router's ipsets (KUBE-SRC-*, KUBE-DST-*): destroyable once no rule refers to them
our_ipsets() { command -v ipset >/dev/null && ipset list -n 2>/dev/null | grep -E '^KUBE-' || true; }
remove_ipsets() {
  local s n=0
  for s in $(our_ipsets); do ipset destroy "$s" 2>/dev/null && n=$((n + 1)); done
  ((n == 0)) || log "destroyed $n ipsets"
}

# nftables tables the cluster created (listed at start) and left empty: delete them
remove_new_nft_tables() {
  local before=$CLUSTER_STATE/nft-tables.before fam name
  [[ -f $before ]] && command -v nft >/dev/null || return 0
  while read -r _ fam name; do
    [[ -n $name ]] || continue
    grep -qxF "table $fam $name" "$before" && continue
    # only chain skeletons left (no rule lines)?
    if ! nft list table "$fam" "$name" 2>/dev/null | grep -vqE '^\s*(table|chain|type|policy|\}|$)'; then
      nft delete table "$fam" "$name" 2>/dev/null && log "deleted empty nftables table $fam $name"
    fi
  done < <(nft list tables 2>/dev/null)
  return 0
}

restore_sysctls() {
  local f=$CLUSTER_STATE/sysctl.saved line
  [[ -f $f ]] || return 0
  while IFS= read -r line; do
    [[ -n $line ]] || continue
    sysctl -qw "$line" 2>/dev/null || log "could not restore $line"
  done <"$f"
  log "restored host sysctls ($(wc -l <"$f"))"
}

leftovers() {
  local bad=() p
  for p in $(shim_pids); do bad+=("shim pid $p"); done
  if [[ -d $PIDS_DIR ]]; then for p in "$PIDS_DIR"/*; do [[ -e $p ]] && daemon_alive "$(basename "$p")" && bad+=("daemon $(basename "$p")"); done; fi
  for p in $(pgrep -f "^$CLUSTER_CACHE/bin/" || true); do bad+=("process $p: $({ tr '\0' ' ' </proc/$p/cmdline; } 2>/dev/null | cut -c1-80)"); done
  for p in $(pgrep -f -- "--config $CLUSTER_STATE/conf/containerd.toml" || true); do bad+=("containerd pid $p"); done
  [[ -z $(our_mounts) ]] || bad+=("mounts: $(our_mounts | head -3 | tr '\n' ' ')")
  nft list table inet "$EGRESS_NFT_TABLE" >/dev/null 2>&1 && bad+=("nftables table inet $EGRESS_NFT_TABLE")
  [[ -z $(our_ipsets) ]] || bad+=("ipsets: $(our_ipsets | head -3 | tr '\n' ' ')")
  ip link show "$CNI_BRIDGE" >/dev/null 2>&1 && bad+=("interface $CNI_BRIDGE")
  ip link show "$NODE_IF" >/dev/null 2>&1 && bad+=("interface $NODE_IF")
  for p in iptables ip6tables; do
    "$p" -t filter -S 2>/dev/null | grep -qE '^-N (KUBE|CNI)-' && bad+=("$p filter chains")
    "$p" -t nat -S 2>/dev/null | grep -qE '^-N (KUBE|CNI)-' && bad+=("$p nat chains")
  done
  if ((${#bad[@]})); then
    log "LEFT BEHIND: ${bad[*]}"
    return 1
  fi
  log "nothing of the cluster is left (processes, mounts, interfaces, iptables chains, ipsets)"
}

main() {
  local t0=$SECONDS
  if [[ ! -d $CLUSTER_STATE ]] && ! ip link show "$NODE_IF" >/dev/null 2>&1 && [[ -z $(shim_pids) ]]; then
    log "no cluster state found"
  fi
  # node agents first, so nothing restarts the pods we remove
  stop_daemon kubelet 20
  stop_daemon kube-proxy 10
  stop_daemon kube-router 10   # before the chain sweep: it would put its chains back
  stop_containers
  local d
  for d in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_daemon "$d" 20; done
  kill_shims
  stop_daemon containerd 20
  remove_netns
  ip link del "$CNI_BRIDGE" 2>/dev/null && log "deleted interface $CNI_BRIDGE" || true
  ip link del "$NODE_IF" 2>/dev/null && log "deleted interface $NODE_IF" || true
  if [[ -x $K8S_BIN_DIR/kube-proxy ]]; then
    timeout 60 "$K8S_BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1 || true
  fi
  sweep_iptables
  remove_ipsets
  nft delete table inet "$EGRESS_NFT_TABLE" 2>/dev/null && log "deleted nftables table inet $EGRESS_NFT_TABLE" || true
  remove_new_nft_tables
  unmount_all
  restore_sysctls
  rm -rf /var/lib/cni/results/"$CNI_NET_NAME"-* 2>/dev/null || true
  if [[ -f $CLUSTER_STATE/varlog-created ]]; then rm -rf /var/log/pods /var/log/containers; fi
  rm -rf "$CLUSTER_STATE" /run/pyworker-cluster
  if [[ ${PURGE:-0} == 1 ]]; then
    rm -rf "$CTRD_ROOT"
    log "PURGE=1: removed the image store $CTRD_ROOT"
  fi
  leftovers
  log "cluster down ($((SECONDS - t0))s)"
}

main "$@"
