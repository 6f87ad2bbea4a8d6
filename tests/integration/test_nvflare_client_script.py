"""NVIDIA FLARE's own hello-pt client script runs on fl with only its imports changed.

The script is FLARE's own, unmodified (tests/nvflare_examples.py: a copy kept in tests/data/nvflare, or
``FL_NVFLARE_REPO``'s); only its import lines are changed here.
"""

from __future__ import annotations

import sys

import pytest
import torch

from fl.job import FedJob, ScriptRunner
from fl.simulator import simulate
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import run_dir
from tests.nvflare_examples import example_files, source

EXAMPLE = "examples/hello-world/hello-pt"
IMPORTS = {
    "import nvflare.client as flare": "import fl.client as flare",
    "from nvflare.client.tracking import SummaryWriter": "from fl.client.tracking import SummaryWriter",
}


@pytest.mark.timeout(600)
def test_nvflare_hello_pt_client_runs_with_its_imports_changed(tmp_path, monkeypatch):
    files = example_files(EXAMPLE, recursive=False)
    assert "client.py" in files, f"{source()} has no {EXAMPLE}/client.py"
    for name, text in files.items():
        if name == "job.py":
            continue  # FLARE's job definition; ours is below
        for old, new in IMPORTS.items():
            text = text.replace(old, new)
        assert "nvflare" not in "\n".join(
            line for line in text.splitlines() if line.lstrip().startswith(("import", "from"))
        ), f"{name} imports more of nvflare than the Client API"
        (tmp_path / name).write_text(text)

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from model import SimpleNetwork

    job = FedJob(name="nvflare-hello-pt", min_clients=2)
    job.to(FedAvg(num_clients=2, num_rounds=2), "server")
    job.to(SimpleNetwork(), "server")
    args = "--synthetic_data --train_size 64 --test_size 32 --epochs 1 --batch_size 16"
    help_text = files["client.py"]
    if "--num_workers" in help_text:
        args += " --num_workers 0"
    for site in ("site-1", "site-2"):
        job.to(ScriptRunner(script="client.py", script_args=args), site)
    code = simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False)
    sys.modules.pop("model", None)
    run = run_dir(tmp_path / "ws")
    logs = (run / "logs" / "site-1.log").read_text()
    assert code == 0, logs[-3000:]
    assert "Finished Training for site-1" in logs
    assert torch.load(run / "FL_global_model.pt", weights_only=True)["round"] == 1
    assert (run / "validation.json").is_file()
