"""Static checks as tests: ruff (lint and format) and mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKED = ["fl", "jobs", "tests", "bench"]


def _tool(module: str) -> list[str]:
    pytest.importorskip(module, reason=f"{module} (the test extra) is not installed")
    return [sys.executable, "-m", module]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_lint_is_clean():
    proc = _run([*_tool("ruff"), "check", "--output-format", "concise", *CHECKED])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean():
    proc = _run([*_tool("ruff"), "format", "--check", *CHECKED])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean():
    proc = _run([*_tool("mypy"), "fl"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
