#!/usr/bin/env bash
# Stop the cluster that up.sh started and leave the machine as it was before:
#   - stops every process recorded in $ROOT/pids (and their process groups), only if the PID still
#     belongs to the same process (start time recorded by up.sh); never looks processes up by name
#   - kills the pod containers through containerd first, then the containerd shims by the PIDs
#     containerd wrote in its own state folder ($ROOT/containerd/state/.../shim.pid)
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
TASKS_DIR="$ROOT/containerd/state/io.containerd.runtime.v2.task"
if [ -S "$SOCK" ] && timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1; then
  CTR=(timeout 20 ctr --address "$SOCK" --namespace k8s.io)
  for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
    "${CTR[@]}" tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
  sleep 0.5
  for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete -f "$t" >/dev/null 2>&1 || true; done
  for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers delete "$c" >/dev/null 2>&1 || true; done
fi
# the shims' and containers' own PIDs, as containerd recorded them
shim_pids() { find "$TASKS_DIR" -maxdepth 3 \( -name shim.pid -o -name init.pid \) -exec cat {} + 2>/dev/null | sort -u; }
end=$((SECONDS + 10))
while [ $SECONDS -lt $end ]; do
  alive=""; for p in $(shim_pids); do [ -d "/proc/$p" ] && alive+=" $p"; done
  [ -z "$alive" ] && break
  sleep 0.5
done
for p in $(shim_pids); do
  # only a containerd-shim / container process of this cluster: its mount namespace is ours
  if [ -d "/proc/$p" ] && mntns_alive && [ "$(stat -L -c %i "/proc/$p/ns/mnt" 2>/dev/null)" = "$(stat -L -c %i "$MNTNS")" ]; then
    log "killing leftover shim/container process $p"; kill -KILL "$p" 2>/dev/null || true
  fi
done

# 3. containerd, the API server, etcd
for n in containerd kube-apiserver etcd; do stop "$n" 20; done

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

# 5. network namespace (deleting it removes its veth pair, bridge and iptables rules)
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
left=""
while read -r n pid st; do pid_is "$pid" "$st" && left+=" $n($pid)"; done < <(cat "$ROOT/pids" 2>/dev/null)
[ -z "$left" ] || log "WARNING: still running:$left"
if findmnt -rn -o TARGET | grep -c "^$ROOT\(/\|$\)" >/dev/null; then log "WARNING: mounts left below $ROOT"; fi
if [ -n "$CGROOT" ]; then for mnt in /sys/fs/cgroup/*; do [ -d "$mnt$CGROOT" ] && log "WARNING: cgroup left: $mnt$CGROOT"; done; fi
if [ -n "$left" ]; then log "down incomplete after $((SECONDS - T0)) s"; exit 1; fi
# all stopped: mark the record as done so that up.sh may start again from this ROOT
mv -f "$ROOT/pids" "$ROOT/pids.stopped" 2>/dev/null || true
log "down in $((SECONDS - T0)) s"
