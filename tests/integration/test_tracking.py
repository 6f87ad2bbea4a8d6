"""Experiment tracking end to end: sites' writers → the server's receivers → MLflow / W&B.

The MLflow test starts a real ``mlflow server`` on loopback with a sqlite store, runs a small job
in the simulator with MLflowReceiver pointing at it, and reads the metrics back with MlflowClient.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fl.job import FedJob, ScriptRunner
from fl.simulator import simulate
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import run_dir

ROUNDS = 2
SCRIPT = """
import fl.client as flare
from fl.client.tracking import MLflowWriter, SummaryWriter

flare.init()
site = flare.get_site_name()
mlflow, tb = MLflowWriter(), SummaryWriter()
mlflow.log_params({"site_param": site, "lr": 0.5})
mlflow.set_tag("data", "synthetic-" + site)
while flare.is_running():
    model = flare.receive()
    r = model.current_round
    if not flare.is_train():  # the final model's validation
        flare.send(flare.FLModel(metrics={"acc": 0.5 + r / 10}))
        continue
    mlflow.log_metric("loss", 10.0 - r, step=r)
    mlflow.log_metrics({"acc": 0.5 + r / 10, "f1": 0.25}, step=r)
    tb.add_scalar("tb_metric", float(r * 2), global_step=r)
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, metrics={"acc": 0.5 + r / 10}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real MLflow tracking server on loopback (sqlite store), ended by PID at teardown."""
    pytest.importorskip("mlflow", reason="the tracking extra installs mlflow")
    port = _free_port()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(store / "server.log", "wb")  # noqa: SIM115 (closed at teardown)
    # No job runner: it would leave a huey folder in /dev/shm behind (the tracking API needs none of it).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=store, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not come up on {url}:\n{(store / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, sig)  # its own session: the server and its workers
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _tracking_job(tmp_path: Path, receiver: object) -> Path:
    (tmp_path / "train.py").write_text(SCRIPT)
    job = FedJob(name="tracking", min_clients=2, key_metric="acc")
    job.to(FedAvg(num_clients=2, num_rounds=ROUNDS), "server")
    job.to(np.zeros((2, 3), dtype=np.float32), "server")
    job.to(receiver, "server", id="mlflow_receiver")
    for site in ("site-1", "site-2"):
        job.to(ScriptRunner(script="train.py", framework="numpy"), site)
    return job.export_job(tmp_path / "export")


@pytest.mark.timeout(600)
def test_mlflow_receiver_puts_each_sites_metrics_in_a_run_of_one_experiment(tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient

    from fl.components.mlflow_receiver import MLflowReceiver

    monkeypatch.chdir(tmp_path)
    receiver = MLflowReceiver(
        tracking_uri=mlflow_server,
        kw_args={"experiment_name": "fl-tracking-test", "run_name": "hello", "run_tags": {"team": "fl"}},
    )
    code = simulate(_tracking_job(tmp_path, receiver), tmp_path / "ws", progress=False)
    run = run_dir(tmp_path / "ws")
    assert code == 0, (run / "logs" / "site-1.log").read_text()[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("fl-tracking-test")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"site-1-hello", "site-2-hello", "server-hello"}
    for site in ("site-1", "site-2"):
        r = runs[f"{site}-hello"]
        assert r.info.status == "FINISHED"
        assert r.data.params == {"site_param": site, "lr": "0.5"}
        assert r.data.tags["data"] == f"synthetic-{site}"
        assert r.data.tags["team"] == "fl" and r.data.tags["site"] == site
        loss = client.get_metric_history(r.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(i, 10.0 - i) for i in range(ROUNDS)]
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "acc")) == list(range(ROUNDS))
        assert [m.value for m in client.get_metric_history(r.info.run_id, "tb_metric")] != []
    server_metrics = runs["server-hello"].data.metrics
    assert "global/acc" in server_metrics


@pytest.mark.timeout(600)
def test_wandb_receiver_writes_offline_runs_per_site_on_disk(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the tracking extra installs wandb")
    from fl.components.wandb_receiver import WandBReceiver

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    receiver = WandBReceiver(wandb_args={"project": "fl-test", "group": "g", "job_type": "train", "name": "hello"})
    code = simulate(_tracking_job(tmp_path, receiver), tmp_path / "ws", progress=False)
    run = run_dir(tmp_path / "ws")
    assert code == 0, (run / "logs" / "site-1.log").read_text()[-3000:]
    offline = sorted((run / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 3, offline  # site-1, site-2 and the server's aggregated metrics
    files = [p for d in offline for p in d.rglob("*.wandb")]
    assert len(files) == 3 and all(p.stat().st_size > 0 for p in files)
    logs = (run / "logs").glob("*.log")
    assert not any("not delivered" in p.read_text() for p in logs)
