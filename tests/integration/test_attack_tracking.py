"""A site that claims params and tags beyond the bounds, against a real TLS server with an MLflow receiver.

The server cuts each value to MAX_RECORD_TEXT and drops record kinds no receiver knows; the job
finishes and the honest values arrive.
"""

from __future__ import annotations

import json

import pytest

from fl.components.tracking import MAX_RECORD_TEXT
from fl.proto import federation_pb2 as pb
from tests.integration.adversary import Adversary
from tests.integration.federation import wait_for

pytestmark = pytest.mark.timeout(900)


def test_oversized_params_and_unknown_record_kinds_are_cut_and_dropped_by_the_server(
    federation, tmp_path, make_job, monkeypatch
):
    pytest.importorskip("mlflow", reason="the tracking extra installs mlflow")
    # MLflow's client would cut long values itself; off, a value the server did not cut fails the batch.
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    from mlflow.tracking import MlflowClient

    from fl.components.mlflow_receiver import MLflowReceiver

    fed = federation
    fed.start_server()
    fed.start_site("site-1")
    job = make_job(sites=2, min_clients=1, rounds=1)
    job.to(MLflowReceiver(kw_args={"experiment_name": "attack", "run_name": "r"}), "server", id="mlflow")
    with Adversary(fed, "site-2") as attacker:
        attacker.register()
        fed.wait_sites(["site-1", "site-2"])
        proc = fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json")
        assert proc.returncode == 0, proc.stderr
        job_id = str(json.loads(proc.stdout)["job_id"])
        task = attacker.poll_for("task", timeout=120)
        attacker.report(
            job_id,
            metrics=[
                pb.MetricRecord(tag="huge", kind="param", text="p" * (1024 * 1024)),
                pb.MetricRecord(tag="odd", kind="artifact", text="/etc/passwd", value=1.0),
                pb.MetricRecord(tag="honest", kind="tag", text="ok"),
                pb.MetricRecord(tag="loss", value=0.5, step=1),
            ],
        )
        assert attacker.submit(task, error="done").accepted

        def ended() -> dict[str, str] | None:
            attacker.poll(0.2)
            record = fed.job(job_id)
            return record if record["status"] in ("finished", "failed", "aborted") else None

        final = wait_for(ended, 300, f"job {job_id} to end")
    assert final["status"] == "finished", final["message"]
    db = fed.root / "server" / "jobs" / job_id / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("attack")
    assert experiment is not None
    [run] = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "site-2-r"]
    assert run.data.params == {"huge": "p" * MAX_RECORD_TEXT}
    assert run.data.tags["honest"] == "ok" and "odd" not in run.data.tags
    assert run.data.metrics == {"loss": 0.5}
