"""fl's Python children import fl, not a folder named fl in their working directory (3.11+ and 3.10 paths)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fl import pythonpath

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shadowing_cwd(tmp_path: Path) -> Path:
    """A working directory whose fl package would fail any import of fl from it."""
    (tmp_path / "fl").mkdir()
    (tmp_path / "fl" / "__init__.py").write_text("raise ImportError('the fl folder in the working directory')\n")
    return tmp_path


@pytest.mark.parametrize("safe_path_flag", [True, False], ids=["-P (3.11+)", "bootstrap (3.10)"])
def test_module_command_ignores_an_fl_folder_in_the_working_directory(monkeypatch, shadowing_cwd, safe_path_flag):
    monkeypatch.setattr(pythonpath, "SAFE_PATH_FLAG", safe_path_flag)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = str(REPO)  # fl as an installed package would be found: after the working directory
    proc = subprocess.run(
        pythonpath.module_command("fl", "--version"), cwd=shadowing_cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("fl "), proc.stderr[-2000:]


def test_module_command_passes_arguments_through_the_bootstrap(monkeypatch, tmp_path):
    monkeypatch.setattr(pythonpath, "SAFE_PATH_FLAG", False)
    (tmp_path / "show_argv.py").write_text("import sys\nprint(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        pythonpath.module_command("show_argv", "a", "--b", "c d"), env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.stdout.strip() == "['a', '--b', 'c d']", proc.stderr


def test_script_command_keeps_the_scripts_folder_first(tmp_path):
    """A training script imports the job's modules next to it, as with `python script.py`."""
    (tmp_path / "helper.py").write_text("VALUE = 42\n")
    (tmp_path / "train.py").write_text("import helper\nprint(helper.VALUE)\n")
    proc = subprocess.run(pythonpath.script_command(tmp_path / "train.py"), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "42", proc.stderr
