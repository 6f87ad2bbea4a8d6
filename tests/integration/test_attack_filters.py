"""Server-side result filters a site cannot get around: against a real TLS server, sites that hold real
certificates send results straight over gRPC; the server's ExcludeVars keeps a tensor out of the global
model whatever they send, and a result that makes a filter fail is refused naming the filter and the site."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fl.tensors import write_tensors
from tests.integration.adversary import Adversary
from tests.integration.federation import Federation, wait_for
from tests.integration.test_filters_simulator import export_two_part_job, set_filters

pytestmark = pytest.mark.timeout(300)
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, SITES, heartbeat_timeout=300)
    yield fed
    fed.stop()


def _send(site: Adversary, task: Any, params: dict[str, np.ndarray], meta: dict[str, Any], tmp_path: Path) -> Any:
    path = tmp_path / f"{site.name}-update.safetensors"
    write_tensors(path, params)
    upload_id, reply = site.upload(task, path.read_bytes())
    assert reply.complete
    return site.submit(task, upload_id=upload_id, meta=meta)


def test_server_filters_hold_whatever_sites_send(federation, tmp_path, monkeypatch):
    fed = federation
    folder = export_two_part_job(monkeypatch, tmp_path / "export", sites=SITES, rounds=1, min_clients=2)
    (server_config,) = folder.glob("app*/config/config_fed_server.json")
    set_filters(
        server_config,
        "task_result_filters",
        [
            {"path": "fl.filters.ExcludeVars", "args": {"exclude_vars": ["bias"]}},
            {"path": "fl.filters.PercentilePrivacy", "args": {"percentile": 0, "gamma": 1e9}},  # changes nothing
        ],
    )
    fed.start_server()
    sites = [Adversary(fed, name) for name in SITES]
    for site in sites:
        site.register()
    job_id = json.loads(fed.fl("submit", str(folder), "--json").stdout)["job_id"]
    tasks = [site.poll_for("task") for site in sites]

    weights = [np.arange(16, dtype=np.float32), np.full(16, 4.0, np.float32)]
    for site, task, weight, bias in zip(sites[:2], tasks[:2], weights, (1e6, -3e5), strict=True):
        reply = _send(site, task, {"weight": weight, "bias": np.full(4, bias, np.float32)}, {}, tmp_path)
        assert reply.accepted, reply.message
    # A meta value the filter cannot use: the filter fails, that result is refused, the job goes on.
    bad = {"weight": np.full(16, 1e6, np.float32), "bias": np.zeros(4, np.float32)}
    refused = _send(sites[2], tasks[2], bad, {"NUM_STEPS_CURRENT_ROUND": "abc"}, tmp_path)
    assert not refused.accepted
    assert (
        "task_result_filters[0].filters[1] (PercentilePrivacy) failed on task 'train' of site 'site-3'"
        in refused.message
    ), refused.message

    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]
    proc = fed.fl("download", job_id, "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    model = torch.load(tmp_path / "out" / "FL_global_model.pt", weights_only=True)["model"]
    assert torch.equal(model["bias"], torch.zeros(4))  # what the sites sent for it never arrived
    np.testing.assert_array_equal(model["weight"].numpy(), (weights[0] + weights[1]) / 2)
    for site in sites:
        site.close()
