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
    models = {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "site-1", "site-2"}  # FLARE's names
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


def test_server_kill_9_during_cross_site_eval_resumes_it_without_training_again(tmp_path, make_job):
    """FedAvg, then cross-site evaluation; the server dies after the global model's evaluations and
    comes back: the sites get only the evaluations left, and the matrix is whole."""
    import json as json_

    import numpy as np

    from fl.tensors import write_tensors
    from fl.workflows.cross_site_eval import CrossSiteModelEval
    from tests.integration.adversary import Adversary
    from tests.integration.federation import Federation, wait_for

    fed = Federation(tmp_path / "fed", ["site-1", "site-2"], heartbeat_timeout=300)
    try:
        server = fed.start_server()
        sites = [Adversary(fed, name) for name in ("site-1", "site-2")]
        for site in sites:
            site.register()
        job = make_job(rounds=1)
        job.to(CrossSiteModelEval(submit_model_timeout=60, validation_timeout=60), "server")
        job_id = json_.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]

        def answer(site: Adversary, expected: str, value: float | None = None) -> str:
            task = site.poll_for("task", timeout=120)
            assert task.name == expected, (site.name, task.name)
            upload_id = ""
            if value is not None:
                path = tmp_path / f"{site.name}.safetensors"
                write_tensors(path, {"weight": np.full(16, value, np.float32)})
                upload_id, _ = site.upload(task, path.read_bytes())
            reply = site.submit(task, upload_id=upload_id, metrics={"score": value or 0.5})
            assert reply.accepted, reply.message
            return str(json_.loads(task.meta_json).get("_model_owner_", ""))

        for site, value in zip(sites, (1.0, 1.0), strict=True):
            answer(site, "train", value)
        for site in sites:
            answer(site, "validate")  # FedAvg's final validation
        for site, value in zip(sites, (5.0, 7.0), strict=True):
            answer(site, "submit_model", value)
        assert {answer(site, "validate") for site in sites} == {"SRV_FL_global_model.pt"}
        job_dir = fed.root / "server" / "jobs" / job_id
        state = job_dir / "state-1.json"
        wait_for(lambda: len(json_.loads(state.read_text())["evaluated"]) == 1, 60, "the first model's evaluations")
        server.kill9()

        fed.start_server()
        for site in sites:
            site.register(running_jobs=[job_id])
        owners = [answer(site, "validate") for _ in range(2) for site in sites]
        assert sorted(owners) == ["site-1", "site-1", "site-2", "site-2"]
        final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job")
        assert final["status"] == "finished", final["message"]
        matrix = json_.loads((job_dir / "cross_site_val" / "cross_val_results.json").read_text())
        assert {site: set(models) for site, models in matrix.items()} == {
            "site-1": {"SRV_FL_global_model.pt", "site-1", "site-2"},
            "site-2": {"SRV_FL_global_model.pt", "site-1", "site-2"},
        }
        for site in sites:
            site.close()
    finally:
        fed.stop()
