#!/bin/sh
# Build the runtime inside the images' build stages (see images/README.md), in three steps whose
# layers change at different rates, so that a code change rebuilds only the last small one:
#
#   install-venv.sh requirements PYPROJECT OUT
#       The project's runtime dependencies (no extras, no torch/torchvision) from pyproject.toml's
#       [project].dependencies, one a line, into OUT. Other edits of pyproject.toml do not change OUT.
#   install-venv.sh deps VENV REQUIREMENTS APP_DIR
#       Make the venv: torch (and torchvision) first, exactly as TORCH_SPEC / TORCHVISION_SPEC say and
#       from TORCH_INDEX_URL, then REQUIREMENTS under a constraint that holds torch, so that resolving
#       them can never swap the torch build (CUDA for CPU or back). A .pth file puts APP_DIR on the
#       venv's sys.path: the project itself is installed there by the next step.
#   install-venv.sh app VENV PROJECT_DIR APP_DIR
#       The project alone (pip install --no-deps --target APP_DIR; its console script in APP_DIR/bin),
#       then `pip check` of the whole.
#
# An empty TORCHVISION_SPEC leaves torchvision out (the fl runtime does not import it; hello-pt needs
# it only for real CIFAR10). pip keeps its downloads in its cache (/root/.cache/pip), which the
# Dockerfiles mount as a build cache: nothing of it lands in a layer that ships.
#
# Environment (the Dockerfiles pass their build arguments through), for `deps`:
#   VARIANT           cuda | cpu
#   TORCH_SPEC        pip requirement or wheel path for torch, e.g. torch==2.14.1
#   TORCHVISION_SPEC  same for torchvision; empty for none
#   TORCH_INDEX_URL   index for torch/torchvision; empty: cuda -> pip's default index (PyPI),
#                     cpu -> https://download.pytorch.org/whl/cpu
set -eu

die() { echo "install-venv: $*" >&2; exit 2; }
# pip_install VENV ARGS...: pip install into VENV (its downloads cached in pip's cache folder).
pip_install() { _py="$1/bin/python"; shift; "${_py}" -m pip install --disable-pip-version-check "$@"; }

requirements() {
    [ $# -eq 2 ] || die "usage: install-venv.sh requirements PYPROJECT OUT"
    python3 - "$1" "$2" <<'PY'
import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    sys.exit("install-venv: reading pyproject.toml needs Python 3.11 or newer (tomllib)")

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
with open(sys.argv[2], "w") as out:
    for req in dependencies:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
        if name and name.group(0).lower().replace("_", "-") in ("torch", "torchvision"):
            continue
        out.write(req + "\n")
PY
    printf 'install-venv: dependencies: %s\n' "$(tr '\n' ' ' < "$2")"
}

deps() {
    [ $# -eq 3 ] || die "usage: install-venv.sh deps VENV REQUIREMENTS APP_DIR"
    venv="$1" reqs="$2" app="$3"
    case "${VARIANT:-}" in
        cuda) index="${TORCH_INDEX_URL:-}" ;;
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;;
        *) die "VARIANT must be 'cuda' or 'cpu', got '${VARIANT:-}'" ;;
    esac
    [ -n "${TORCH_SPEC:-}" ] || die "TORCH_SPEC is empty; the runtime needs torch"

    python3 -m venv "${venv}"
    echo "install-venv: torch '${TORCH_SPEC}' torchvision '${TORCHVISION_SPEC:-}' from '${index:-default index}'"
    # shellcheck disable=SC2086  # the specs are single words; an empty TORCHVISION_SPEC must vanish
    pip_install "${venv}" ${index:+--index-url "${index}"} ${TORCH_SPEC} ${TORCHVISION_SPEC:-}

    constraints="$(mktemp)"
    "${venv}/bin/python" - "${constraints}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        try:
            f.write(f"{name}=={version(name)}\n")
        except PackageNotFoundError:
            pass
PY
    pip_install "${venv}" --constraint "${constraints}" --requirement "${reqs}"
    rm -f "${constraints}"
    site_packages="$("${venv}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "${app}" > "${site_packages}/fl-app.pth"
}

app() {
    [ $# -eq 3 ] || die "usage: install-venv.sh app VENV PROJECT_DIR APP_DIR"
    venv="$1" project="$2" app="$3"
    pip_install "${venv}" --no-deps --target "${app}" "${project}"
    # Consistency check; a missing torchvision is the one allowed gap (TORCHVISION_SPEC empty).
    if ! report="$("${venv}/bin/python" -m pip check 2>&1)"; then
        unexpected="$(printf '%s\n' "${report}" | grep -v -E '^fl [^ ]+ requires torchvision, which is not installed\.$' || true)"
        if [ -n "${unexpected}" ]; then
            printf '%s\n' "${report}" >&2
            exit 1
        fi
        echo "install-venv: note: torchvision not installed (TORCHVISION_SPEC empty)"
    fi
    "${venv}/bin/python" -m pip list --format=freeze
}

step="${1:-}"
[ $# -gt 0 ] && shift
case "${step}" in
    requirements) requirements "$@" ;;
    deps) deps "$@" ;;
    app) app "$@" ;;
    *) die "usage: install-venv.sh requirements|deps|app ... (see the header of this file)" ;;
esac
