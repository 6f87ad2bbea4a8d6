#!/usr/bin/env bash
# Stand-in for cluster DNS (CoreDNS is not available here). Started by up.sh inside the cluster's
# namespaces; dnsmasq on the node address serves the folder this loop keeps up to date:
#   <svc>.<ns>.svc.cluster.local                 -> ClusterIP           (normal Services)
#   <svc>.<ns>.svc.cluster.local                 -> every ready pod IP  (headless Services)
#   <hostname>.<svc>.<ns>.svc.cluster.local      -> that pod's IP       (StatefulSet pods of headless Services)
# dnsmasq keeps records of a changed hosts file until SIGHUP, so on every change this sends SIGHUP to the
# dnsmasq whose PID is in DNSMASQ_PID_FILE (written by up.sh).
# Usage: dns-sync.sh KUBECTL KUBECONFIG HOSTS_DIR DNSMASQ_PID_FILE [INTERVAL_SECONDS]
set -euo pipefail
kubectl="$1"; kubeconfig="$2"; hosts_dir="$3"; pid_file="$4"; interval="${5:-1}"
mkdir -p "$hosts_dir"
# jq program: one "IP NAME" line per record
read -r -d '' prog <<'JQ' || true
  (.items | map(select(.kind == "Service")) | .[]
     | select(.spec.clusterIP != null and .spec.clusterIP != "None")
     | "\(.spec.clusterIP) \(.metadata.name).\(.metadata.namespace).svc.cluster.local"),
  ( [.items[] | select(.kind == "Service" and .spec.clusterIP == "None") | "\(.metadata.namespace)/\(.metadata.name)"] as $headless
   | .items[] | select(.kind == "Endpoints")
   | select(("\(.metadata.namespace)/\(.metadata.name)") as $k | $headless | index([$k]))
   | .metadata as $m | (.subsets // [])[] | (.addresses // [])[]
   | "\(.ip) \($m.name).\($m.namespace).svc.cluster.local",
     (select(.hostname != null) | "\(.ip) \(.hostname).\($m.name).\($m.namespace).svc.cluster.local"))
JQ
while true; do
  if json="$("$kubectl" --kubeconfig="$kubeconfig" --cache-dir="$hosts_dir/../kube-cache" --request-timeout=5s get services,endpoints -A -o json 2>/dev/null)"; then
    jq -r "$prog" <<<"$json" | sort > "$hosts_dir/.svc.tmp"
    if ! cmp -s "$hosts_dir/.svc.tmp" "$hosts_dir/svc"; then
      mv -f "$hosts_dir/.svc.tmp" "$hosts_dir/svc"
      [ -s "$pid_file" ] && kill -HUP "$(cat "$pid_file")" 2>/dev/null || true
    fi
  fi
  sleep "$interval"
done
