#!/usr/bin/env bash
# Runs the e2e suite on the local single-node Kubernetes of tests/e2e/local_cluster:
# start the cluster (building Kubernetes once, cached), build fl's images with podman from the
# Dockerfiles as they are and import them, run `pytest tests/e2e`, and tear everything down.
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
# Tear down, then drop the cluster's image store (gigabytes; images are imported again next run);
# the logs stay in $ROOT/logs.
trap 'bash "$LC/down.sh" >/dev/null 2>&1 || true; rm -rf "$ROOT/containerd"' EXIT
echo "== local cluster: up"
KUBECONFIG="$(bash "$LC/up.sh")"
echo "== local cluster: up after $((SECONDS - started)) s ($KUBECONFIG)"

export FL_E2E_KUBECONFIG="$KUBECONFIG"
export FL_E2E_IMAGE_PREFIX="localhost/"
export FL_E2E_IMAGE_LOADER="bash $LC/images.sh build -t {tag} -f {dockerfile} {build_args} {context}"
# The local build: torch's CPU wheel from this machine's wheel folder (download.pytorch.org is out of
# reach), everything else from PyPI through the machine's pip configuration (images/README.md).
export FL_E2E_BUILD_ARGS="TORCH_SPEC=torch==2.13.0+cpu TORCH_INDEX_URL=https://pypi.org/simple"

"$PY" -m pytest tests/e2e -v -rs --durations=0 -p no:cacheprovider "$@"
echo "== e2e finished in $((SECONDS - started)) s"
