"""SCAFFOLD's results are checked against their own layout (model + control changes) by a real TLS server.

Both sites are :class:`~tests.integration.adversary.Adversary` clients with real certificates: the
server must refuse an upload that lacks the control changes or smuggles other tensors, accept the
exact result layout, and keep the controls out of the saved global model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from fl.tensors import load_numpy, write_tensors
from fl.workflows.scaffold import Scaffold
from tests.integration.adversary import Adversary
from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(300)
NUMEL = 16
SITES = ["site-1", "site-2"]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, SITES, heartbeat_timeout=300)
    yield fed
    fed.stop()


def _upload(site: Adversary, task: Any, tensors: dict[str, np.ndarray], tmp_path: Path) -> str:
    path = tmp_path / f"{site.name}-update.safetensors"
    write_tensors(path, tensors)
    upload_id, reply = site.upload(task, path.read_bytes())
    assert reply.complete
    return upload_id


def test_a_scaffold_result_without_its_control_changes_or_with_extra_tensors_is_refused(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    sites = [Adversary(fed, name) for name in SITES]
    for site in sites:
        site.register()
    job = make_job(sites=2, rounds=1, workflow=Scaffold(num_clients=2, num_rounds=1, round_timeout=120.0))
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    tasks = [site.poll_for("task") for site in sites]
    received = tmp_path / "task.safetensors"
    received.write_bytes(sites[0].download(tasks[0].model))
    model = load_numpy(received)
    assert set(model) == {"weight", "scaffold_c_global.weight"}  # the controls travel with the model
    np.testing.assert_array_equal(model["scaffold_c_global.weight"], np.zeros(NUMEL, np.float32))

    attacker, task = sites[1], tasks[1]
    weight = np.ones(NUMEL, np.float32)
    for bad, problem in (
        ({"weight": weight}, "missing tensors"),
        (
            {"weight": weight, "scaffold_c_diff.weight": weight, "scaffold_c_global.weight": weight},
            "unexpected tensors",
        ),
        ({"weight": weight, "scaffold_c_diff.weight": np.ones(3, np.float32)}, "scaffold_c_diff.weight: shape"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            _upload(attacker, task, bad, tmp_path)
        assert problem in str(refused.value.details()), refused.value.details()

    for site, task, value in zip(sites, tasks, (1.0, 3.0), strict=True):
        full = {
            "weight": np.full(NUMEL, value, np.float32),
            "scaffold_c_diff.weight": np.full(NUMEL, value, np.float32),
        }
        upload_id = _upload(site, task, full, tmp_path)
        assert site.submit(task, upload_id=upload_id, meta={}).accepted
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]
    proc = fed.fl("download", job_id, "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(tmp_path / "out" / "FL_global_model.pt", weights_only=True)["model"]
    assert set(saved) == {"weight"}
    np.testing.assert_array_equal(saved["weight"].numpy(), np.full(NUMEL, 2.0, np.float32))
    for site in sites:
        site.close()
