#!/bin/sh
# Build the runtime venv inside the images' builder stage (see images/README.md).
#
#   install-venv.sh VENV_DIR PROJECT_DIR
#
# torch (and torchvision) are installed first, exactly as TORCH_SPEC / TORCHVISION_SPEC say and from
# TORCH_INDEX_URL, and are then held by a constraints file, so that resolving the project's other
# dependencies can never swap the torch build (CUDA for CPU or back). An empty TORCHVISION_SPEC
# leaves torchvision out (the fl runtime does not import it; hello-pt needs it only for real CIFAR10).
#
# Environment (the Dockerfiles pass their build arguments through):
#   VARIANT           cuda | cpu
#   TORCH_SPEC        pip requirement or wheel path for torch, e.g. torch==2.14.1
#   TORCHVISION_SPEC  same for torchvision; empty for none
#   TORCH_INDEX_URL   index for torch/torchvision; empty: cuda -> pip's default index (PyPI),
#                     cpu -> https://download.pytorch.org/whl/cpu
set -eu

venv="$1"
project="$2"

case "${VARIANT:-}" in
    cuda) index="${TORCH_INDEX_URL:-}" ;;
    cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;;
    *) echo "install-venv: VARIANT must be 'cuda' or 'cpu', got '${VARIANT:-}'" >&2; exit 2 ;;
esac
if [ -z "${TORCH_SPEC:-}" ]; then
    echo "install-venv: TORCH_SPEC is empty; the runtime needs torch" >&2; exit 2
fi

python3 -m venv "${venv}"
py="${venv}/bin/python"
pip_install() { "${py}" -m pip install --no-cache-dir --disable-pip-version-check "$@"; }

echo "install-venv: torch '${TORCH_SPEC}' torchvision '${TORCHVISION_SPEC:-}' from '${index:-default index}'"
# shellcheck disable=SC2086  # the specs are single words; an empty TORCHVISION_SPEC must vanish
pip_install ${index:+--index-url "${index}"} ${TORCH_SPEC} ${TORCHVISION_SPEC:-}

constraints="$(mktemp)"
"${py}" - "${constraints}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        try:
            f.write(f"{name}=={version(name)}\n")
        except PackageNotFoundError:
            pass
PY

# The project without its dependencies, then its dependencies minus torch/torchvision (already
# installed above), read back from the installed metadata so that pyproject.toml stays the one list.
pip_install --no-deps "${project}"
deps="$("${py}" - <<'PY'
import re
from importlib.metadata import requires

for req in requires("fl") or []:
    if "extra ==" in req:
        continue
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
    if name and name.group(0).lower().replace("_", "-") in ("torch", "torchvision"):
        continue
    print(req)
PY
)"
printf 'install-venv: dependencies: %s\n' "$(printf '%s' "${deps}" | tr '\n' ' ')"
# Each line is one requirement (it may hold spaces and markers); split on newlines only.
old_ifs="${IFS}"
IFS='
'
# shellcheck disable=SC2086
pip_install --constraint "${constraints}" ${deps}
IFS="${old_ifs}"
rm -f "${constraints}"

# Consistency check; a missing torchvision is the one allowed gap (TORCHVISION_SPEC empty).
if ! report="$("${py}" -m pip check 2>&1)"; then
    unexpected="$(printf '%s\n' "${report}" | grep -v -E '^fl [^ ]+ requires torchvision, which is not installed\.$' || true)"
    if [ -n "${unexpected}" ]; then
        printf '%s\n' "${report}" >&2
        exit 1
    fi
    echo "install-venv: note: torchvision not installed (TORCHVISION_SPEC empty)"
fi
"${py}" -m pip list --format=freeze
