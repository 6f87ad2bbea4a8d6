"""jobs/cross-site-eval and jobs/fedprox in the simulator: offline, each with its one command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl.fsutil import read_json
from fl.tensors import load_numpy
from tests.integration.conftest import run_dir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
TINY = ["--dataset", "synthetic", "--train-size", "64", "--test-size", "32", "--epochs", "1"]


def run_job(name: str, workspace: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python jobs/<name>/job.py`` on the offline dataset, CIFAR10 out of reach."""
    env = dict(os.environ, FL_DATA_ROOT="/nonexistent-fl-data")
    command = [sys.executable, str(REPO / "jobs" / name / "job.py"), "--workspace", str(workspace), *TINY, *extra]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cross_site_eval_job_writes_the_full_site_by_model_matrix(tmp_path):
    run_job("cross-site-eval", tmp_path)
    job = run_dir(tmp_path)
    matrix = read_json(job / "cross_site_val" / "cross_val_results.json")
    models = {"SRV_FL_global_model.pt", "site-1", "site-2"}
    assert set(matrix) == {"site-1", "site-2"}
    for site, scores in matrix.items():
        assert set(scores) == models, site
        assert all(0.0 <= metrics["accuracy"] <= 1.0 for metrics in scores.values()), scores
    # The sites' models are their own local training, not the global model again.
    shared = job / "cross_site_val" / "model_shareables"
    global_model, local_1, local_2 = (load_numpy(shared / f"{i}.safetensors") for i in range(3))
    assert set(local_1) == set(global_model) == set(local_2)
    assert any((local_1[k] != global_model[k]).any() for k in global_model)
    assert any((local_1[k] != local_2[k]).any() for k in global_model)
    assert read_json(job / "workflows.json") == {"finished": ["controller", "controller_1"]}


def test_fedprox_job_trains_with_the_proximal_term(tmp_path):
    proc = run_job("fedprox", tmp_path, "--mu", "0.1")
    job = run_dir(tmp_path)
    assert "fedprox finished" in proc.stdout
    for site in ("site-1", "site-2"):
        log = (job / "logs" / f"{site}.log").read_text()
        assert "FedProx mu 0.1" in log and "round 2 epoch 1/1" in log, site
    assert [m["model_version"] for m in read_json(job / "validation.json")["models"]] == [0, 1, 2]
