"""Where the tests find the command-line tools that tools/install-tools.sh installs (helm, kubectl,
hadolint, kubernetes-validate): its cache first, then PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def tools_bin() -> Path:
    """The installer's folder of tools ($FL_CACHE_DIR/tools/bin)."""
    cache = os.environ.get("FL_CACHE_DIR") or str(Path.home() / ".cache" / "fl")
    return Path(cache) / "tools" / "bin"


def tool_path(name: str) -> str | None:
    """The tool's path from the installer's cache or PATH; None when it is in neither."""
    candidate = tools_bin() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def find_tool(name: str) -> str:
    """The tool's path; skips the test, naming the tool and how to install it, when it is missing."""
    found = tool_path(name)
    if found is None:
        pytest.skip(f"{name} not found in {tools_bin()} or on PATH; install it with: bash tools/install-tools.sh")
    return found
