"""Where the tests find the command-line tools that tools/install-tools.sh installs (helm, kubectl,
hadolint, kubernetes-validate): its cache first, then PATH.

``python -m tests.tools`` (run by scripts/test.sh) prints one line for each tool that the suite
needs and cannot find, and exits 1 if there is any.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

INSTALL_HINT = "bash tools/install-tools.sh"

#: The tools that tests/unit and tests/integration use (kubectl serves only tests/e2e), and what for.
SUITE_TOOLS = {
    "helm": "the Helm chart tests",
    "kubernetes-validate": "the manifests' schema checks",
    "hadolint": "the Dockerfile lint",
}


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
        pytest.skip(f"{name} not found in {tools_bin()} or on PATH; install it with: {INSTALL_HINT}")
    return found


def missing_tool_lines() -> list[str]:
    """One line per tool of :data:`SUITE_TOOLS` that is missing, naming what needs it and how to get it."""
    return [
        f"missing tool: {name}, needed by {purpose}; get it with: {INSTALL_HINT} (into {tools_bin()}) or on PATH"
        for name, purpose in SUITE_TOOLS.items()
        if tool_path(name) is None
    ]


def main() -> int:
    """Print the missing tools' lines; 0 when every tool is there, 1 otherwise."""
    lines = missing_tool_lines()
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
