#!/usr/bin/env bash
# Runs the e2e suite on the local single-node Kubernetes of tests/e2e/local_cluster:
# start the cluster (building Kubernetes once, cached), build fl's images with podman from the
# Dockerfiles as they are and import them, run `pytest tests/e2e`, and tear everything down. When the
# selection holds test_two_clusters.py, a second cluster B (linked to A's node) starts after A, gets the images too.
#   tests/e2e/run_local.sh [pytest arguments]
# Needs root (network and mount namespaces). Uses $PY, or the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
LC=tests/e2e/local_cluster
PY="${PY:-${FL_VENV:-$PWD/.venv}/bin/python}"
started=$SECONDS

ROOT="${FL_CLUSTER_ROOT:-/tmp/fl-local-cluster}"
# One run at a time on this machine (they share the netns, the API port and $ROOT): a second run
# waits for the first to finish instead of failing or tearing down the other's cluster. The lock is
# released when this process ends, however it ends.
LOCK="${FL_CACHE_DIR:-/root/.cache/fl}/local-cluster.lock"
mkdir -p "$(dirname "$LOCK")"
exec 7>"$LOCK"
if ! flock -n 7; then
  echo "== another e2e run holds $LOCK; waiting for it (up to ${FL_CLUSTER_LOCK_WAIT:-2400} s)"
  flock -w "${FL_CLUSTER_LOCK_WAIT:-2400}" 7 || { echo "ERROR: $LOCK still held after ${FL_CLUSTER_LOCK_WAIT:-2400} s" >&2; exit 1; }
fi
# Cluster B, for tests/e2e/test_two_clusters.py only: its own ROOT, netns, API port, node name, cgroup and
# ranges, linked to A's netns (README.md, "Two clusters").
ROOT_B="${FL_CLUSTER_B_ROOT:-$ROOT-b}"
CLUSTER_B=(FL_CLUSTER_ROOT="$ROOT_B" FL_CLUSTER_NETNS="${FL_CLUSTER_NETNS:-fl-local-cluster}-b"
           FL_CLUSTER_API_PORT="${FL_CLUSTER_B_API_PORT:-16444}" FL_CLUSTER_NODE_NAME=fl-node-b
           FL_CLUSTER_NODE_CIDR=10.251.0.0/24 FL_CLUSTER_POD_CIDR=10.245.0.0/24 FL_CLUSTER_SERVICE_CIDR=10.97.0.0/16
           FL_CLUSTER_PEER_NETNS="${FL_CLUSTER_NETNS:-fl-local-cluster}"
           FL_CLUSTER_PEER_NODE_CIDR="${FL_CLUSTER_NODE_CIDR:-10.250.0.0/24}")
# Tear down (B first: it owns the link into A's netns), then drop each cluster's image store (gigabytes;
# images are imported again next run); the logs stay in $ROOT/logs and $ROOT_B/logs.
teardown() {
  if [ -n "${B_STARTED:-}" ]; then env "${CLUSTER_B[@]}" bash "$LC/down.sh" >/dev/null 2>&1 || true; rm -rf "$ROOT_B/containerd"; fi
  bash "$LC/down.sh" >/dev/null 2>&1 || true; rm -rf "$ROOT/containerd"
}
trap teardown EXIT
echo "== local cluster: up"
KUBECONFIG="$(bash "$LC/up.sh")"
echo "== local cluster: up after $((SECONDS - started)) s ($KUBECONFIG)"

# Cluster B only when the selection holds the two-cluster test; if B cannot start, that test skips saying so.
if "$PY" -m pytest tests/e2e --collect-only -q -p no:cacheprovider "$@" 2>/dev/null | grep -c '^tests/e2e/test_two_clusters.py::' >/dev/null; then
  b_started=$SECONDS
  B_STARTED=1
  if KUBECONFIG_B="$(env "${CLUSTER_B[@]}" bash "$LC/up.sh")"; then
    echo "== local cluster B: up in $((SECONDS - b_started)) s ($KUBECONFIG_B)"
    export FL_E2E_KUBECONFIG_B="$KUBECONFIG_B"
    export FL_E2E_IMAGE_IMPORT_B="env FL_CLUSTER_ROOT=$ROOT_B bash $LC/images.sh import {tags}"
  else
    echo "== local cluster B: up.sh failed after $((SECONDS - b_started)) s (logs in $ROOT_B/logs)"
    export FL_E2E_CLUSTER_B_MISSING="cluster B did not start (tests/e2e/local_cluster/up.sh failed; logs in $ROOT_B/logs)"
  fi
fi

export FL_E2E_KUBECONFIG="$KUBECONFIG"
export FL_E2E_IMAGE_PREFIX="localhost/"
export FL_E2E_IMAGE_LOADER="bash $LC/images.sh build -t {tag} -f {dockerfile} {build_args} {context}"
# The local build: torch's CPU wheel from this machine's wheel folder (download.pytorch.org is out of
# reach), everything else from PyPI through the machine's pip configuration (images/README.md).
export FL_E2E_BUILD_ARGS="TORCH_SPEC=torch==2.13.0+cpu TORCH_INDEX_URL=https://pypi.org/simple"

"$PY" -m pytest tests/e2e -v -rs --durations=0 -p no:cacheprovider "$@"
echo "== e2e finished in $((SECONDS - started)) s"
