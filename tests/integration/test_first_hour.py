"""A new user's first hour: fl installed the way scripts/venv.sh installs it keeps working from a
directory that holds a folder named ``fl`` (an empty one, as fl's own default workspaces under
/tmp/fl make, or someone's unrelated package), for ``fl --version`` and a real ``fl simulate``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import run_dir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)

UNRELATED_PACKAGE = '"""Someone\'s own package that happens to be called fl."""\n\nVALUE = 1\n'


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with this checkout installed by scripts/install-fl.sh (what
    scripts/venv.sh runs); its dependencies come from this interpreter's site-packages by a .pth file
    (nothing is downloaded, and the shared environment is not touched)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "zz-fl-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-fl.sh"), str(python), "", "--no-deps", "--no-build-isolation"],
        capture_output=True, text=True, env=_clean_env(), timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "Compat editable" not in install.stderr  # the one filtered setuptools warning
    return root


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: fl must come from the install, not from a path setting."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}


@pytest.fixture(params=["empty fl folder", "unrelated fl package"])
def shadowed_cwd(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A working directory holding a folder named fl."""
    cwd = tmp_path / "work"
    (cwd / "fl").mkdir(parents=True)
    if request.param == "unrelated fl package":
        (cwd / "fl" / "__init__.py").write_text(UNRELATED_PACKAGE)
    return cwd


def _run(venv: Path, cwd: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_fl_version_works_from_a_directory_holding_an_fl_folder(venv, shadowed_cwd):
    proc = _run(venv, shadowed_cwd, "fl", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fl "), proc.stderr[-2000:]


def test_python_dash_m_fl_works_beside_an_empty_fl_folder(venv, tmp_path):
    """The editable install is a path entry: a real package on sys.path beats a namespace portion."""
    (tmp_path / "fl").mkdir()
    proc = _run(venv, tmp_path, "python", "-m", "fl", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fl "), proc.stderr[-2000:]


def test_fl_simulate_works_from_a_directory_holding_an_fl_folder(venv, shadowed_cwd, make_job):
    """The issue's case: the workspace lives under ./fl, and the simulator's children start from here."""
    folder = make_job(rounds=1, sites=2).export_job(shadowed_cwd.parent / "export")
    workspace = shadowed_cwd / "fl" / "simulate"
    proc = _run(venv, shadowed_cwd, "fl", "simulate", str(folder), "-n", "2", "-w", "fl/simulate", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = torch.load(run_dir(workspace) / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), 1.0))
    # The scripts are forks of the run's warm worker, which this venv's interpreter runs (the job's
    # result above needs fl from the install, not the ./fl folder).
    assert "starting training script (a fork of the warm worker, torch imported): " in proc.stderr
