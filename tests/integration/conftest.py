"""Integration tests: real server, site agents and script processes on loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fl.job import FedJob, ScriptRunner
from fl.workflows.base import Controller
from fl.workflows.fedavg import FedAvg
from tests.integration.federation import Federation

FIXTURES = Path(__file__).parent / "fixture_jobs"


#: Lines of each daemon's log a failed test's report shows (the server's and the sites', newest last).
FAILURE_LOG_LINES = 80


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that ran a federation shows the end of each of its daemons' logs in its report,
    so a failure seen only in CI (a race under load) can be read there."""
    report = yield
    fed = getattr(item, "funcargs", {}).get("federation")
    if report.when == "call" and report.failed and isinstance(fed, Federation):
        for daemon in fed.daemons:
            tail = daemon.log().splitlines()[-FAILURE_LOG_LINES:]
            report.sections.append((f"log of {daemon.name} (last {len(tail)} lines)", "\n".join(tail)))
    return report


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """A federation of two sites (site-1, site-2) with TLS, stopped after the test (tests/integration/federation.py)."""
    fed = Federation(tmp_path, ["site-1", "site-2"])
    yield fed
    fed.stop()


@pytest.fixture
def make_job(monkeypatch) -> Iterator[Callable[..., FedJob]]:
    """Build a job from tests/integration/fixture_jobs with the Job API."""
    monkeypatch.chdir(FIXTURES)
    monkeypatch.syspath_prepend(str(FIXTURES))

    def make(
        *,
        name: str = "test-job",
        sites: int = 2,
        rounds: int = 2,
        min_clients: int | None = None,
        numel: int = 16,
        script_args: dict[str, str] | None = None,
        framework: str = "numpy",
        round_timeout: float = 120.0,
        workflow: Controller | None = None,
        script: str = "src/plus_one.py",
    ) -> FedJob:
        from src.models import FlatModel

        job = FedJob(name=name, min_clients=min_clients or sites)
        job.to(
            workflow
            or FedAvg(num_clients=sites, num_rounds=rounds, min_clients=min_clients, round_timeout=round_timeout),
            "server",
        )
        job.to(FlatModel(numel), "server")
        for i in range(sites):
            site = f"site-{i + 1}"
            args = (script_args or {}).get(site, "")
            job.to(ScriptRunner(script=script, script_args=args, framework=framework), site)
        return job

    yield make
    for name in ("src.models", "src"):
        sys.modules.pop(name, None)


def run_dir(workspace: Path) -> Path:
    jobs = sorted((workspace / "server" / "jobs").iterdir())
    assert len(jobs) == 1
    return jobs[0]
