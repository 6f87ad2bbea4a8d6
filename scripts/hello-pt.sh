#!/usr/bin/env bash
# Runs the hello-pt example in the simulator (2 sites, 2 rounds), installing fl first if needed.
#   scripts/hello-pt.sh [job.py arguments, e.g. --num-rounds 5 --n-sites 3]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec "$PY" jobs/hello-pt/job.py "$@"
