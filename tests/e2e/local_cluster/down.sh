#!/usr/bin/env bash
# Stop the cluster that up.sh started and leave the machine as it was before:
#   - stops every process recorded in $ROOT/pids (and their process groups), only if the PID still
#     belongs to the same process (start time recorded by up.sh); never looks processes up by name
#   - kills the pod containers through containerd first; then whatever is left of them (say containerd
#     died): processes in the cgroups below the cluster's cgroupRoot (containers) or in the cluster's
#     private mount namespace (containerd shims), which only this cluster's processes can be in
#   - unmounts everything below $ROOT in the cluster's mount namespace (kubelet volumes, containerd
#     snapshots, ...), then the namespace pins; deletes the netns (and its veth pair) and the
#     /run/netns mount if up.sh's `ip netns add` created it; removes the cgroups it made
#   - leaves $ROOT's files (logs) in place for inspection; up.sh wipes them on the next start
# Safe to run twice, after a failed up.sh, or when nothing is running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
T0=$SECONDS

if [ ! -d "$ROOT" ]; then log "nothing to do: $ROOT does not exist"; exit 0; fi
NETNS="$FL_CLUSTER_NETNS"; CGROOT=""; RUN_NETNS_WAS_MOUNTED=1; RUN_NETNS_EXISTED=1; NETNS_CREATED=0
PEER_NETNS=""; PEER_LINK=""
# shellcheck disable=SC1091
[ -f "$ROOT/state.env" ] && source "$ROOT/state.env"
MNTNS="$ROOT/ns/mnt"
mntns_alive() { [ -e "$MNTNS" ] && mountpoint -q "$MNTNS"; }
in_mntns() { nsenter --mount="$MNTNS" "$@"; }


# stop NAME: SIGTERM to the recorded process group, SIGKILL after a grace period
stop() {
  local name="$1" grace="${2:-10}" n pid st
  while read -r n pid st; do
    [ "$n" = "$name" ] || continue
    pid_is "$pid" "$st" || continue
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local end=$((SECONDS + grace))
    while pid_is "$pid" "$st" && [ $SECONDS -lt $end ]; do sleep 0.2; done
    if pid_is "$pid" "$st"; then
      log "$name ($pid) ignored SIGTERM; SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    log "stopped $name ($pid)"
  done < <(cat "$ROOT/pids" 2>/dev/null)
}

# 1. DNS, forwarders and the node agents first, so nothing restarts pods while they are torn down
for n in dns-sync dnsmasq forward-host forward-ns kube-proxy kubelet kube-scheduler kube-controller-manager; do stop "$n"; done

# 2. pod containers: kill and delete every task through containerd, then wait for the shims to exit
SOCK="$ROOT/containerd/containerd.sock"
CTRD_OK=0
if [ -S "$SOCK" ] && timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1; then
  CTRD_OK=1
  CTR=(timeout 20 ctr --address "$SOCK" --namespace k8s.io)
  for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
    "${CTR[@]}" tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
  sleep 0.5
  for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete -f "$t" >/dev/null 2>&1 || true; done
  for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers delete "$c" >/dev/null 2>&1 || true; done
fi
# Whatever is left of the pods (e.g. after containerd died): identified only by what is unique to this
# cluster, never by name: container processes are in the cgroups below the cluster's cgroupRoot; the
# containerd shims (and any runc) are in the cluster's private mount namespace. The recorded services
# (containerd, kube-apiserver, etcd: still running) are spared here and stopped in step 3.
cluster_leftovers() {
  local recorded p f
  recorded=" $(awk '{printf "%s ", $2}' "$ROOT/pids" 2>/dev/null) "
  {
    if [ -n "$CGROOT" ]; then
      for f in $(find /sys/fs/cgroup/*"$CGROOT" -name cgroup.procs 2>/dev/null || true); do cat "$f" 2>/dev/null || true; done
    fi
    if mntns_alive; then
      local ino; ino="$(stat -L -c %i "$MNTNS")"
      for p in /proc/[0-9]*; do
        if [ "$(stat -L -c %i "$p/ns/mnt" 2>/dev/null)" = "$ino" ]; then echo "${p#/proc/}"; fi
      done
    fi
  } | sort -un | while read -r p; do
    if [[ "$recorded" == *" $p "* ]] || [ "$p" = $$ ]; then continue; fi
    if st="$(proc_starttime "$p")" && pid_is "$p" "$st"; then echo "$p"; fi
  done
  return 0
}
if [ "$CTRD_OK" = 1 ]; then   # give the shims a moment to exit on their own after the deletes above
  end=$((SECONDS + 10))
  while [ $SECONDS -lt $end ] && [ -n "$(cluster_leftovers)" ]; do sleep 0.5; done
fi
left_pids="$(cluster_leftovers | xargs)"
if [ -n "$left_pids" ]; then
  log "killing leftover pod/shim processes of this cluster: $left_pids"
  # shellcheck disable=SC2086
  kill -KILL $left_pids 2>/dev/null || true
  end=$((SECONDS + 10))
  while [ $SECONDS -lt $end ] && [ -n "$(cluster_leftovers)" ]; do sleep 0.2; done
fi

# 3. containerd, the API server, etcd
for n in containerd kube-apiserver etcd; do stop "$n" 20; done

# anything still in the cluster's namespace or cgroups now (e.g. a runc started by the dying containerd)
left_pids="$(cluster_leftovers | xargs)"
if [ -n "$left_pids" ]; then
  log "killing leftover processes of this cluster: $left_pids"
  # shellcheck disable=SC2086
  kill -KILL $left_pids 2>/dev/null || true
  end=$((SECONDS + 10))
  while [ $SECONDS -lt $end ] && [ -n "$(cluster_leftovers)" ]; do sleep 0.2; done
  left_pids="$(cluster_leftovers | xargs)"
  # keep the namespace pin and the PID record, so that another down.sh can still find them
  [ -z "$left_pids" ] || { log "ERROR: processes of this cluster survived SIGKILL: $left_pids"; exit 1; }
fi

# 4. mounts: everything below $ROOT inside the cluster's mount namespace, deepest first, then the pins
if mntns_alive; then
  in_mntns findmnt -rn -o TARGET | awk -v r="$ROOT/" 'index($0, r) == 1' | sort -r | while read -r m; do
    in_mntns umount "$m" 2>/dev/null || in_mntns umount -l "$m" 2>/dev/null || log "could not unmount $m (in the cluster's mount namespace)"
  done
fi
if mountpoint -q "$MNTNS" 2>/dev/null; then umount "$MNTNS" && log "released mount namespace $MNTNS"; fi
# anything below $ROOT in the host's mount namespace (the private bind of $ROOT/ns, or left by a crash)
findmnt -rn -o TARGET | awk -v r="$ROOT/" 'index($0, r) == 1 || $0 == substr(r, 1, length(r) - 1)' | sort -r |
  while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; log "umount $m"; done

# 5. the link to a peer cluster (up.sh with FL_CLUSTER_PEER_NETNS): its end and firewall rules in the
# peer's namespace, which outlives this one; then this network namespace (deleting it removes its veth
# pairs, bridge and iptables rules)
if [ -n "$PEER_NETNS" ] && [ -n "$PEER_LINK" ] && ip netns list | awk '{print $1}' | grep -cx "$PEER_NETNS" >/dev/null; then
  peer_firewall DELETE "$PEER_NETNS" "$PEER_LINK"
  if ip -n "$PEER_NETNS" link show "$PEER_LINK" >/dev/null 2>&1; then
    ip -n "$PEER_NETNS" link delete "$PEER_LINK" && log "deleted link $PEER_LINK in netns $PEER_NETNS"
  fi
fi
if [ "${NETNS_CREATED:-0}" = 1 ] && ip netns list | awk '{print $1}' | grep -cx "$NETNS" >/dev/null; then
  ip netns delete "$NETNS" && log "deleted netns $NETNS"
fi
if [ "$RUN_NETNS_WAS_MOUNTED" = 0 ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
  umount /run/netns && log "umount /run/netns (made by ip netns add)"
fi
if [ "$RUN_NETNS_EXISTED" = 0 ] && [ -d /run/netns ] && ! mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
  rmdir /run/netns
fi

# 6. cgroups: kubelet's (below cgroupRoot), then the levels up.sh created, deepest first
if [ -n "$CGROOT" ]; then
  for mnt in /sys/fs/cgroup/*; do
    [ -d "$mnt$CGROOT" ] || continue
    find "$mnt$CGROOT" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
fi
if [ -f "$ROOT/cgroups-created" ]; then
  tac "$ROOT/cgroups-created" | while read -r d; do [ -d "$d" ] && rmdir "$d" 2>/dev/null || true; done
fi

# 7. report what is left (there should be nothing)
left="$(alive_in "$ROOT/pids")"
[ -z "$left" ] || log "WARNING: still running:$left"
if findmnt -rn -o TARGET | grep -c "^$ROOT\(/\|$\)" >/dev/null; then log "WARNING: mounts left below $ROOT"; fi
if [ -n "$CGROOT" ]; then for mnt in /sys/fs/cgroup/*; do [ -d "$mnt$CGROOT" ] && log "WARNING: cgroup left: $mnt$CGROOT"; done; fi
if [ -n "$left" ]; then log "down incomplete after $((SECONDS - T0)) s"; exit 1; fi
# all stopped: mark the record as done so that up.sh may start again from this ROOT
mv -f "$ROOT/pids" "$ROOT/pids.stopped" 2>/dev/null || true
log "down in $((SECONDS - T0)) s"
