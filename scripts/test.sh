#!/usr/bin/env bash
# Runs the test suite (unit and integration; e2e is `pytest tests/e2e`), installing what it needs.
#   scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec "$PY" -m pytest "$@"
