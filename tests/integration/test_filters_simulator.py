"""Filters in a real simulation: site and server task_result_filters keep tensors out of the global model,
and a filter that fails refuses the result with a message that names it (the job does not go on silently)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl.job import FedJob, ScriptRunner
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import FIXTURES, run_dir

pytestmark = pytest.mark.timeout(600)


def export_two_part_job(
    monkeypatch: pytest.MonkeyPatch,
    out: Path,
    *,
    sites: tuple[str, ...] | list[str] = ("site-1", "site-2"),
    rounds: int = 2,
    min_clients: int | None = None,
) -> Path:
    """Sites running plus_one.py over a model of ``weight`` and ``bias`` (zeros); returns the job folder."""
    with monkeypatch.context() as m:
        m.chdir(FIXTURES)
        m.syspath_prepend(str(FIXTURES))
        from src.models import TwoPartModel

        job = FedJob(name="filters", min_clients=min_clients or len(sites))
        job.to(
            FedAvg(num_clients=len(sites), num_rounds=rounds, min_clients=min_clients, round_timeout=120.0), "server"
        )
        job.to(TwoPartModel(16), "server")
        for site in sites:
            job.to(ScriptRunner(script="src/plus_one.py", framework="numpy"), site)
        folder = job.export_job(out)
    for name in ("src.models", "src"):
        sys.modules.pop(name, None)
    return folder


def set_filters(config_path: Path, key: str, filters: list[dict[str, object]]) -> None:
    config = json.loads(config_path.read_text())
    config[key] = [{"tasks": ["train"], "filters": filters}]
    config_path.write_text(json.dumps(config, indent=2))


def simulate(folder: Path, workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(workspace)],
        capture_output=True,
        text=True,
        timeout=500,
    )


def client_configs(folder: Path) -> list[Path]:
    found = sorted(folder.glob("app*/config/config_fed_client.json"))
    assert found, sorted(str(p) for p in folder.rglob("*.json"))
    return found


def test_excluded_tensors_never_change_in_the_global_model(monkeypatch, tmp_path):
    folder = export_two_part_job(monkeypatch, tmp_path / "export")
    for config in client_configs(folder):  # the sites keep "bias" to themselves
        set_filters(
            config, "task_result_filters", [{"path": "fl.filters.ExcludeVars", "args": {"exclude_vars": "bias"}}]
        )
    proc = simulate(folder, tmp_path / "ws")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    model = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]
    assert torch.equal(model["bias"], torch.zeros(4))
    assert torch.equal(model["weight"], torch.full((16,), 2.0))  # the rest trains as without the filter
    assert "task_result_filters applied" in proc.stdout + proc.stderr


def test_server_side_filter_runs_before_aggregation(monkeypatch, tmp_path):
    folder = export_two_part_job(monkeypatch, tmp_path / "export")
    (server_config,) = folder.glob("app*/config/config_fed_server.json")
    set_filters(
        server_config,
        "task_result_filters",
        [{"path": "nvflare.app_common.filters.ExcludeVars", "args": {"exclude_vars": ["weight"]}}],
    )
    proc = simulate(folder, tmp_path / "ws")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    model = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]
    assert torch.equal(model["weight"], torch.zeros(16))
    assert torch.equal(model["bias"], torch.full((4,), 2.0))


def test_a_failing_site_filter_refuses_the_result_with_its_name(monkeypatch, tmp_path):
    folder = export_two_part_job(monkeypatch, tmp_path / "export")
    for config in client_configs(folder):  # FULL task data has no reference: the filter refuses
        set_filters(config, "task_data_filters", [{"path": "fl.filters.PercentilePrivacy", "args": {}}])
    proc = simulate(folder, tmp_path / "ws")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "task_data_filters[0].filters[0] (PercentilePrivacy) failed on task 'train' of site 'site-" in output


def test_filters_added_with_the_job_api_run_on_the_sites_and_the_server(monkeypatch, tmp_path):
    """job.to(ExcludeVars, site, TASK_RESULT) keeps "bias" on the sites; the server's PercentilePrivacy clips."""
    from fl.filters import ExcludeVars, PercentilePrivacy
    from fl.job import FilterType

    with monkeypatch.context() as m:
        m.chdir(FIXTURES)
        m.syspath_prepend(str(FIXTURES))
        from src.models import TwoPartModel

        job = FedJob(name="filters-job-api", min_clients=2)
        job.to(FedAvg(num_clients=2, num_rounds=2, round_timeout=120.0), "server")
        job.to(TwoPartModel(16), "server")
        for site in ("site-1", "site-2"):
            job.to(ScriptRunner(script="src/plus_one.py", framework="numpy"), site)
            job.to(ExcludeVars(exclude_vars=["bias"]), site, filter_type=FilterType.TASK_RESULT, tasks=["train"])
        # Each change of 1.0 (one step) is clipped to gamma; percentile 0 zeroes none of them.
        job.to(
            PercentilePrivacy(percentile=0, gamma=0.5), "server", filter_type=FilterType.TASK_RESULT, tasks=["train"]
        )
        folder = job.export_job(tmp_path / "export")
    for name in ("src.models", "src"):
        sys.modules.pop(name, None)
    proc = simulate(folder, tmp_path / "ws")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    model = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]
    assert torch.equal(model["bias"], torch.zeros(4))  # the sites' filter: never left them
    assert torch.equal(model["weight"], torch.full((16,), 1.0))  # the server's filter: 2 rounds of +0.5, not +1
