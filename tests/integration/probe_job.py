"""A tiny job for numbering, message and workspace tests: FedAvg over sites running round_probe.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fl.job import FedJob, ScriptRunner
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import FIXTURES


def export_probe_job(
    monkeypatch: pytest.MonkeyPatch,
    out: Path,
    *,
    sites: int = 2,
    rounds: int = 2,
    num_clients: int | None = None,
    min_clients: int | None = None,
    round_timeout: float = 120.0,
    script_args: dict[str, str] | None = None,
) -> Path:
    """Export the probe job (a 16-float model of zeros) to ``out``; returns the job folder."""
    with monkeypatch.context() as m:
        m.chdir(FIXTURES)
        m.syspath_prepend(str(FIXTURES))
        from src.models import FlatModel

        job = FedJob(name="probe", min_clients=min_clients or sites)
        fedavg = FedAvg(
            num_clients=num_clients or sites, num_rounds=rounds, min_clients=min_clients, round_timeout=round_timeout
        )
        job.to(fedavg, "server")
        job.to(FlatModel(16), "server")
        for i in range(sites):
            site = f"site-{i + 1}"
            args = (script_args or {}).get(site, "")
            job.to(ScriptRunner(script="src/round_probe.py", script_args=args, framework="numpy"), site)
        folder = job.export_job(out)
    for name in ("src.models", "src"):
        sys.modules.pop(name, None)
    return folder
