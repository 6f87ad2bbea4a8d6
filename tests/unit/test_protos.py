"""The checked-in gRPC code is what the pinned generator makes from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_regenerating_protos_changes_nothing(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the protos")
    shutil.copytree(
        REPO / "fl" / "proto", tmp_path / "fl" / "proto", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            "fl/proto/federation.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for generated in sorted((REPO / "fl" / "proto").glob("*_pb2*")):
        fresh = tmp_path / "fl" / "proto" / generated.name
        assert fresh.read_text() == generated.read_text(), f"{generated.name} is stale: run scripts/gen-protos.sh"
