"""Cross-site evaluation one site cannot break: a model in another layout is refused at upload, the
site's column is missing, its own failures are recorded in its row, and the job still finishes.

Every site is an :class:`~tests.integration.adversary.Adversary` with that site's real certificate
against a real TLS server running :class:`~fl.workflows.cross_site_eval.CrossSiteModelEval`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fl.tensors import load_numpy, write_tensors
from fl.workflows.cross_site_eval import CrossSiteModelEval
from tests.integration.adversary import Adversary, status_code
from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(300)
SITES = ["site-1", "site-2", "site-3"]
NUMEL = 16


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, SITES, heartbeat_timeout=300)
    yield fed
    fed.stop()


def _upload(site: Adversary, task: Any, numel: int, value: float, tmp_path: Path) -> str:
    path = tmp_path / f"{site.name}-model.safetensors"
    write_tensors(path, {"weight": np.full(numel, value, np.float32)})
    upload_id, reply = site.upload(task, path.read_bytes())
    assert reply.complete
    return upload_id


def test_a_site_cannot_submit_a_model_in_another_layout_and_its_failures_stay_in_its_row(
    federation, tmp_path, make_job
):
    fed = federation
    fed.start_server()
    sites = {name: Adversary(fed, name) for name in SITES}
    for site in sites.values():
        site.register()
    workflow = CrossSiteModelEval(submit_model_timeout=60, validation_timeout=60)
    job = make_job(sites=3, workflow=workflow)
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]

    tasks = {name: site.poll_for("task") for name, site in sites.items()}
    assert {t.name for t in tasks.values()} == {"submit_model"}
    for value, name in enumerate(("site-1", "site-2"), start=1):
        reply = sites[name].submit(tasks[name], upload_id=_upload(sites[name], tasks[name], NUMEL, value, tmp_path))
        assert reply.accepted, reply.message
    # site-3 sends a model of another shape: the upload itself is refused, and a result without it too.
    with pytest.raises(grpc.RpcError) as refused:
        _upload(sites["site-3"], tasks["site-3"], NUMEL * 2, 3.0, tmp_path)
    assert status_code(refused.value) is not None
    reply = sites["site-3"].submit(tasks["site-3"])
    assert not reply.accepted and "must carry params" in reply.message, reply.message

    # Three models (the server's, site-1's, site-2's), each to every site; site-3 fails site-1's.
    for _ in range(3):
        for name, site in sites.items():
            task = site.poll_for("task")
            owner = json.loads(task.meta_json)["_model_owner_"]
            path = tmp_path / f"{name}-received.safetensors"
            path.write_bytes(site.download(task.model))
            score = float(load_numpy(path)["weight"].mean())
            if name == "site-3" and owner == "site-1":
                assert site.submit(task, error="cannot evaluate").accepted
            else:
                assert site.submit(task, metrics={"mean": score}).accepted
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]

    out = tmp_path / "out"
    assert fed.fl("download", job_id, "-o", str(out)).returncode == 0
    matrix = json.loads(next(out.rglob("cross_val_results.json")).read_text())
    assert set(matrix) == set(SITES)
    for name in SITES:
        assert set(matrix[name]) == {"SRV_FL_global_model.pt", "site-1", "site-2"}, name
        assert matrix[name]["SRV_FL_global_model.pt"] == {"mean": 0.0}
        assert matrix[name]["site-2"] == {"mean": 2.0}
    assert matrix["site-1"]["site-1"] == matrix["site-2"]["site-1"] == {"mean": 1.0}
    assert "error" in matrix["site-3"]["site-1"]
    for site in sites.values():
        site.close()
