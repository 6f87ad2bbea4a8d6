#!/usr/bin/env bash
# Regenerates the checked-in gRPC/protobuf code from fl/proto/*.proto.
# The generator is pinned (grpcio-tools in pyproject's test extra) so that a regeneration
# on any machine yields the same files; tests/unit/test_protos.py fails on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. fl/proto/*.proto
