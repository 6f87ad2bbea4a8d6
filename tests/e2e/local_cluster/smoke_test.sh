#!/usr/bin/env bash
# End-to-end check of the local cluster:
#   up.sh -> build + import the placeholder image (testdata/placeholder-image) -> kubectl apply
#   testdata/smoke.yaml (echo Deployment + Service in fl-smoke-server, client Jobs in fl-smoke-client that
#   reach echo.fl-smoke-server.svc.cluster.local over TCP, one runs the image's own CMD, one calls the API
#   server in-cluster) -> wait for the Jobs -> helm install --wait
#   --wait-for-jobs of testdata/smoke-chart -> down.sh -> check that nothing is left behind
#   (processes, mounts, netns, veth, cgroups). Prints the time of each step. Exit 0 only if all passed.
# FL_SMOKE_KEEP=1 leaves the cluster up at the end (and after a failure) for inspection.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
T0=$SECONDS
declare -a TIMES=()
step_start=$SECONDS
step_done() { TIMES+=("$(printf '%-34s %4d s' "$1" $((SECONDS - step_start)))"); log "step done: $1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }

IMAGE="localhost/fl-placeholder:smoke"
eval "$("$LC_DIR/tools.sh")"   # HELM, KUBECTL
# helm's and kubectl's caches/config stay in ROOT, not in the home folder
export HELM_CACHE_HOME="$ROOT/helm/cache" HELM_CONFIG_HOME="$ROOT/helm/config" HELM_DATA_HOME="$ROOT/helm/data" KUBECACHEDIR="$ROOT/kube-cache"
K() { "$KUBECTL" --kubeconfig="$ROOT/admin.kubeconfig" --cache-dir="$ROOT/kube-cache" "$@"; }
# expect_log NS JOB REGEX: the Job's log (shown) has a line matching REGEX
expect_log() {
  local out; out="$(K -n "$1" logs "job/$2")"
  printf '%s\n' "$out" | sed "s#^#  [$1/$2] #" >&2
  grep -q -- "$3" <<<"$out" || { log "job $1/$2: no line matching '$3' in its log"; return 1; }
}

status="FAILED"
finish() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "smoke test failed (rc=$rc); cluster state:"
    K get nodes,pods,svc,jobs -A -o wide >&2 2>&1 || true
    K get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -25 >&2 || true
    for ns in fl-smoke-server fl-smoke-client fl-smoke-helm; do
      for p in $(K -n "$ns" get pods -o name 2>/dev/null); do echo "----- logs $ns/$p" >&2; K -n "$ns" logs "$p" --tail=20 >&2 2>&1 || true; done
    done
  fi
  if [ "${FL_SMOKE_KEEP:-0}" = 1 ]; then log "FL_SMOKE_KEEP=1: cluster left running; stop it with down.sh"; exit $rc; fi
  step_start=$SECONDS
  "$LC_DIR/down.sh" || rc=1
  step_done "down.sh"
  # nothing may be left behind
  local leftovers=""
  local alive; alive="$(alive_in "$ROOT/pids.stopped")"
  [ -z "$alive" ] || leftovers+=" process:${alive# }"
  [ -s "$ROOT/pids" ] && leftovers+=" pids-file-not-cleared"
  findmnt -rn -o TARGET | grep -c "^$ROOT\(/\|$\)" >/dev/null && leftovers+=" mounts-under-ROOT"
  ip netns list | awk '{print $1}' | grep -cx "$FL_CLUSTER_NETNS" >/dev/null && leftovers+=" netns"
  ip link show node0 >/dev/null 2>&1 && leftovers+=" veth-on-host"
  # a cluster linked to a peer (FL_CLUSTER_PEER_NETNS): its link end and firewall rules there are gone
  local peer_link; peer_link="$(awk -F= '$1=="PEER_LINK"{print $2}' "$ROOT/state.env" 2>/dev/null || true)"
  if [ -n "$peer_link" ] && ip netns list | awk '{print $1}' | grep -cx "$FL_CLUSTER_PEER_NETNS" >/dev/null; then
    ip -n "$FL_CLUSTER_PEER_NETNS" link show "$peer_link" >/dev/null 2>&1 && leftovers+=" link:$FL_CLUSTER_PEER_NETNS/$peer_link"
    nsenter --net="/run/netns/$FL_CLUSTER_PEER_NETNS" iptables -w -S INPUT | grep -c "fl-peer $peer_link" >/dev/null &&
      leftovers+=" iptables:$FL_CLUSTER_PEER_NETNS/$peer_link"
  fi
  local cg; cg="$(awk -F= '$1=="CGROOT"{print $2}' "$ROOT/state.env" 2>/dev/null || true)"
  if [ -n "$cg" ]; then for m in /sys/fs/cgroup/*; do [ -d "$m$cg" ] && leftovers+=" cgroup:$m$cg"; done; fi
  if [ -n "$leftovers" ]; then log "LEFT BEHIND:$leftovers"; rc=1; else log "clean: no processes, mounts, netns, veth or cgroups left"; fi
  [ $rc -eq 0 ] && status="PASSED"
  echo "=== local-cluster smoke test: $status in $((SECONDS - T0)) s"
  printf '  %s\n' "${TIMES[@]}"
  exit $rc
}
trap finish EXIT

# 1. cluster
"$LC_DIR/up.sh" >/dev/null
step_done "up.sh (incl. build-k8s.sh)"

# 2. image
"$LC_DIR/images.sh" build -t "$IMAGE" "$LC_DIR/testdata/placeholder-image"
step_done "images.sh build + import"

# 3. plain manifests: Service reached across namespaces by DNS name over TCP
sed "s#IMAGE#$IMAGE#g" "$LC_DIR/testdata/smoke.yaml" | K apply -f -
K -n fl-smoke-server rollout status deployment/echo --timeout=180s
K -n fl-smoke-client wait --for=condition=complete job/echo-client job/hello job/api-from-pod --timeout=180s
expect_log fl-smoke-client echo-client '^ok: echo.fl-smoke-server.svc.cluster.local'
expect_log fl-smoke-client hello 'placeholder image: ok'
expect_log fl-smoke-client api-from-pod '^ok: https://kubernetes.default.svc.cluster.local/version says v1.20'
step_done "kubectl apply: Deployment+Service+Jobs"

# 4. helm
"$HELM" --kubeconfig "$ROOT/admin.kubeconfig" install fl-smoke "$LC_DIR/testdata/smoke-chart" \
  --namespace fl-smoke-helm --create-namespace --set image="$IMAGE" --wait --wait-for-jobs --timeout 4m
expect_log fl-smoke-helm fl-smoke-client '^ok: fl-smoke-echo.fl-smoke-helm.svc.cluster.local'
step_done "helm install --wait --wait-for-jobs"
