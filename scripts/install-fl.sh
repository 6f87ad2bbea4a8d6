#!/usr/bin/env bash
# Installs this checkout of fl into a Python environment: editable, the one way every script does it.
#   scripts/install-fl.sh PYTHON [EXTRAS] [pip options...]      e.g. scripts/install-fl.sh .venv/bin/python "[test]"
# setuptools' "compat" editable mode puts the checkout on sys.path with a .pth file, so fl is a
# regular package found before any folder named fl in the working directory. The default
# ("lenient") mode finds fl only after the normal path search, and there an empty fl/ folder in the
# working directory already won as a namespace package (ImportError: cannot import name
# '__version__' from 'fl' (unknown location)). setuptools calls compat mode "transitional" and
# warns about it on every install; that one warning is filtered, the rest are shown.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:?usage: scripts/install-fl.sh PYTHON [EXTRAS] [pip options...]}"
extras="${2:-}"
shift $(( $# < 2 ? $# : 2 ))
PYTHONWARNINGS="ignore:Compat editable installs:UserWarning${PYTHONWARNINGS:+,$PYTHONWARNINGS}" \
    "$python" -m pip install --quiet --disable-pip-version-check "$@" \
    --config-settings editable_mode=compat -e "$repo$extras"
