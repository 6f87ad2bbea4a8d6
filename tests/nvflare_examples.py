"""NVIDIA FLARE's example scripts, the inputs of fl's FLARE-compatibility tests.

They come from ``FL_NVFLARE_REPO`` when it is set (a checkout, read as it is, or a git folder, read
at the ref a test names), else from the copies kept in ``tests/data/nvflare`` (unmodified, Apache
License 2.0; ``SOURCE.md`` there names the commits, ``update.sh`` refreshes them), so a fresh
machine without FLARE's repository still runs every one of these tests.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COPIES = Path(__file__).resolve().parent / "data" / "nvflare"

__all__ = ["COPIES", "example_files", "source"]


def source() -> str:
    """Where the scripts come from, for messages."""
    return os.environ.get("FL_NVFLARE_REPO") or str(COPIES)


def example_files(folder: str, ref: str = "main", *, recursive: bool = True) -> dict[str, str]:
    """The Python files under ``folder`` (at ``ref``), keyed by their path relative to it."""
    repo = os.environ.get("FL_NVFLARE_REPO")
    if repo is None:
        return _read_tree(COPIES / ref / folder, recursive, f"run tests/data/nvflare/update.sh to add {folder}")
    if (Path(repo) / folder).is_dir() and not (Path(repo) / "HEAD").is_file():
        return _read_tree(Path(repo) / folder, recursive, "")
    git = ["git", "--git-dir", repo]
    listed = subprocess.run([*git, "ls-tree", "-r", "--name-only", f"{ref}:{folder}"], capture_output=True, text=True)
    if listed.returncode:
        raise FileNotFoundError(f"FL_NVFLARE_REPO={repo} has no {folder} at {ref}: {listed.stderr.strip()}")
    names = [n for n in listed.stdout.split() if n.endswith(".py") and (recursive or "/" not in n)]
    texts = {}
    for name in names:
        shown = subprocess.run([*git, "show", f"{ref}:{folder}/{name}"], capture_output=True, text=True, check=True)
        texts[name] = shown.stdout
    return texts


def _read_tree(root: Path, recursive: bool, hint: str) -> dict[str, str]:
    if not root.is_dir():
        raise FileNotFoundError(f"no FLARE example folder {root}" + (f" ({hint})" if hint else ""))
    paths = root.rglob("*.py") if recursive else root.glob("*.py")
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(paths)}
