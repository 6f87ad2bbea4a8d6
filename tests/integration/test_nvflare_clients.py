"""NVIDIA FLARE's NumPy and Lightning client scripts run on fl with ``nvflare`` replaced by ``fl`` in their imports.

The scripts are read from an NVFlare repository at test time (FL_NVFLARE_REPO, default this
machine's mirror); nothing of FLARE is copied into this project. The job around each script is
built with fl's Job API.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

from fl.aliases import NVFLARE_ALIASES
from fl.job import FedJob, ScriptRunner
from fl.simulator import simulate
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import run_dir
from tests.integration.test_nvflare_client_script import DEFAULT_REPO, _example_files

HELLO_NUMPY = "examples/hello-world/hello-numpy"
HELLO_LIGHTNING = "examples/hello-world/hello-lightning"
_FROM_IMPORT = re.compile(r"^(\s*)from (fl(?:\.\w+)+) import (.+)$")


def _finder_serves(module: str) -> bool:
    """Whether ``module`` (FLARE's layout under ``fl.``) imports: the FLARE import finder serves it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _fl_imports(text: str) -> str:
    """``nvflare`` replaced by ``fl`` in the import lines only, as a user porting a script does.

    Where a FLARE module path is not served by fl's import finder on this branch, the line is
    pointed at the fl object NVFLARE_ALIASES names for it (so the alias entries are what is tested).
    """
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith(("import ", "from ")):
            line = line.replace("nvflare", "fl")
            match = _FROM_IMPORT.match(line)
            if match and not _finder_serves(match.group(2)):
                line = _alias_import(match.group(1), match.group(2), match.group(3))
        lines.append(line)
    return "\n".join(lines) + "\n"


def _alias_import(indent: str, module: str, names: str) -> str:
    flare_module = "nvflare" + module[len("fl") :]
    parts = []
    for name in (n.strip() for n in names.split(",")):
        target = NVFLARE_ALIASES.get(f"{flare_module}.{name}")
        assert target, f"fl has no alias for {flare_module}.{name}"
        target_module, target_name = target.rsplit(".", 1)
        parts.append(
            f"{indent}from {target_module} import {target_name}" + (f" as {name}" if name != target_name else "")
        )
    return "\n".join(parts)


def _port_example(tmp_path: Path, example: str) -> dict[str, str]:
    repo = Path(os.environ.get("FL_NVFLARE_REPO", DEFAULT_REPO))
    if not repo.exists():
        pytest.skip(f"no NVFlare repository at {repo} (set FL_NVFLARE_REPO to a checkout of NVIDIA/NVFlare)")
    files = _example_files(repo, example)
    if "client.py" not in files:
        pytest.skip(f"{repo} has no {example}/client.py")
    for name, text in files.items():
        if name not in ("job.py", "prepare_data.py"):  # FLARE's job definition; ours is in the test
            (tmp_path / name).write_text(_fl_imports(text))
    return files


def _numpy_job(update_type: str, rounds: int) -> FedJob:
    job = FedJob(name=f"nvflare-hello-numpy-{update_type}", min_clients=2, key_metric="weight_mean")
    job.to(FedAvg(num_clients=2, num_rounds=rounds), "server")
    job.to(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32), "server")
    for site in ("site-1", "site-2"):
        job.to(ScriptRunner(script="client.py", script_args=f"--update_type {update_type}", framework="numpy"), site)
    return job


@pytest.mark.timeout(600)
@pytest.mark.parametrize("update_type", ["full", "diff"])
def test_nvflare_hello_numpy_client_ends_with_the_exact_array(tmp_path, monkeypatch, update_type):
    _port_example(tmp_path, HELLO_NUMPY)
    monkeypatch.chdir(tmp_path)
    rounds = 3
    code = simulate(_numpy_job(update_type, rounds).export_job(tmp_path / "export"), tmp_path / "ws", progress=False)
    run = run_dir(tmp_path / "ws")
    logs = (run / "logs" / "site-1.log").read_text()
    assert code == 0, logs[-3000:]
    final = np.load(run / "models" / "server.npy", allow_pickle=False)
    # Each site adds 1 per round (FULL: sends the new array; DIFF: sends +1): the average moves by exactly 1.
    expected = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32) + rounds
    assert final.dtype == np.float32
    np.testing.assert_array_equal(final, expected)
    assert (run / "models" / "best_server.npy").is_file()
    assert (run / "tb_events" / "site-1").is_dir()


@pytest.mark.timeout(900)
def test_nvflare_hello_lightning_client_trains_through_patch(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_lightning", reason="the test extra installs pytorch-lightning")
    pytest.importorskip("torchmetrics", reason="hello-lightning's model uses torchmetrics")
    import torch

    _port_example(tmp_path, HELLO_LIGHTNING)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from model import LitNet

    initial = {k: v.clone() for k, v in LitNet().state_dict().items()}
    job = FedJob(name="nvflare-hello-lightning", min_clients=2)  # key metric "accuracy", as the example logs
    job.to(FedAvg(num_clients=2, num_rounds=2), "server")
    job.to(LitNet(), "server")
    args = "--synthetic_data --batch_size 4 --limit_batches 2"
    for site in ("site-1", "site-2"):
        job.to(ScriptRunner(script="client.py", script_args=args), site)
    try:
        code = simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False)
    finally:
        import sys

        sys.modules.pop("model", None)
    run = run_dir(tmp_path / "ws")
    logs = (run / "logs" / "site-1.log").read_text()
    assert code == 0, logs[-4000:]
    assert "--- train new model ---" in logs
    final = torch.load(run / "FL_global_model.pt", weights_only=True)
    assert final["round"] == 1
    assert set(final["model"]) == set(initial)
    assert any(not torch.equal(final["model"][k], initial[k]) for k in initial), "the global model never trained"
    validation = (run / "validation.json").read_text()
    assert "accuracy" in validation, validation
