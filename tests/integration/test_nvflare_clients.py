"""NVIDIA FLARE's own hello-numpy and hello-lightning examples (``job.py`` and its client script) run on fl,
with ``nvflare`` replaced by ``fl`` in their import lines and nothing else.

The examples are FLARE's own, unmodified (tests/nvflare_examples.py: copies kept in tests/data/nvflare,
or FL_NVFLARE_REPO's). Each ``job.py`` runs as its own
process (``python job.py ...``, as its README says) with only arguments the example itself offers;
FL_SIMULATOR_WORKSPACE_ROOT (fl's counterpart of FLARE's NVFLARE_SIMULATOR_WORKSPACE_ROOT) puts
the simulator's workspace under the test's folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl.aliases import NVFLARE_ALIASES
from tests.nvflare_examples import example_files, source

HELLO_NUMPY = "examples/hello-world/hello-numpy"
HELLO_LIGHTNING = "examples/hello-world/hello-lightning"
_FROM_IMPORT = re.compile(r"^(\s*)from (fl(?:\.\w+)+) import (.+)$")
_RESULT_LINE = re.compile(r"^Result can be found in : (.+)$", re.MULTILINE)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Seconds a job.py may run (2 cores shared by several test runs; they take about 3 s and 20 s alone).
JOB_TIMEOUT_S = 480


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


def _port_example(tmp_path: Path, example: str) -> None:
    """The example's files in ``tmp_path``, ``nvflare`` replaced by ``fl`` in their import lines only."""
    files = example_files(example, recursive=False)
    assert "job.py" in files and "client.py" in files, f"{source()} has no {example}/job.py and client.py"
    for name, text in files.items():
        (tmp_path / name).write_text(_fl_imports(text))


def _run_job(tmp_path: Path, *args: str) -> str:
    """``python job.py ARGS`` in ``tmp_path`` with this project's fl; returns its output (it must exit 0)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "FL_SIMULATOR_WORKSPACE_ROOT": str(tmp_path / "ws"),
    }
    proc = subprocess.run(
        [sys.executable, "job.py", *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("update_type", ["full", "diff"])
def test_flare_hello_numpy_job_py_ends_with_the_exact_array(tmp_path, update_type):
    _port_example(tmp_path, HELLO_NUMPY)
    # The example's own flag: FULL sends the new array (TransferType.FULL), DIFF sends +1 (TransferType.DIFF).
    output = _run_job(tmp_path, "--update_type", update_type)
    assert "Job Status is: finished" in output, output[-3000:]
    match = _RESULT_LINE.search(output)
    assert match, output[-3000:]
    result = Path(match.group(1).strip())  # run.get_result()
    assert result.is_relative_to(tmp_path / "ws" / "hello-numpy"), result
    final = np.load(result / "models" / "server.npy", allow_pickle=False)
    # Each site adds 1 per round, so the average moves by exactly 1 a round (3 rounds: the example's default).
    expected = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32) + 3
    assert final.dtype == np.float32
    np.testing.assert_array_equal(final, expected)
    assert (result / "tb_events" / "site-1").is_dir()  # add_experiment_tracking(recipe, "tensorboard")


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_flare_hello_lightning_job_py_trains_the_global_model(tmp_path):
    pytest.importorskip("pytorch_lightning", reason="the test extra installs pytorch-lightning")
    pytest.importorskip("torchmetrics", reason="hello-lightning's model uses torchmetrics")
    import torch

    from fl.tensors import load_torch

    _port_example(tmp_path, HELLO_LIGHTNING)
    # The example's own small-data flags: FakeData instead of CIFAR-10 (offline), 2 batches of 4 per stage.
    output = _run_job(tmp_path, "--synthetic_data", "--batch_size", "4", "--limit_batches", "2")
    result = (tmp_path / "ws" / "hello-lightning-fedavg" / "latest").resolve()
    assert "--- train new model ---" in (result / "logs" / "site-1.log").read_text(), output[-3000:]
    (initial_file,) = (result / "job" / "app_server" / "initial_weights").glob("*.safetensors")
    initial = load_torch(initial_file)
    final = torch.load(result / "FL_global_model.pt", weights_only=True)
    assert final["round"] == 1
    assert set(final["model"]) == set(initial)
    assert any(not torch.equal(final["model"][k], initial[k]) for k in initial), "the global model never trained"
    validation = (result / "validation.json").read_text()
    assert '"accuracy"' in validation, validation


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_flare_hello_numpy_full_script_under_diff_transfer_is_sent_as_a_difference(tmp_path, monkeypatch):
    """FLARE's TransferType.DIFF with a script sending FULL arrays still ends exact, end to end (the wire's
    DIFF is proven in tests/unit/test_client_api.py; this shows the server adds it to the right base)."""
    from fl.recipe import NumpyFedAvgRecipe, SimEnv

    _port_example(tmp_path, HELLO_NUMPY)
    monkeypatch.chdir(tmp_path)
    recipe = NumpyFedAvgRecipe(
        name="numpy-full-as-diff", min_clients=2, num_rounds=2, model=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        train_script="client.py", train_args="--update_type full", params_transfer_type="DIFF",
    )  # fmt: skip
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=tmp_path / "ws"))
    result = run.get_result()
    assert run.get_status() == "finished" and result is not None
    final = np.load(result / "models" / "server.npy", allow_pickle=False)
    # Had the FULL arrays been added as differences, the model would have grown far past +2.
    np.testing.assert_array_equal(final, np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32) + 2)
