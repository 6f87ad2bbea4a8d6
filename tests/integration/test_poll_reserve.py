"""A server with few RPC workers and many daemon-style sites (each asking for a long poll): polls park only up to
the workers' reserve, the rest are told to come back later, and meanwhile heartbeats, downloads, uploads and
results are served: no site is lost, and a job that starts on all 40 sites and trains on each of them finishes.

The server keeps 8 of its 16 workers from polls; 40 sites ask to wait 30 s each. Without the reserve, 16 parked
polls would hold every worker for 30 s and the heartbeats (every 1 s, a site lost after 10 s) would queue
behind them (FL_TEST_NO_POLL_RESERVE=1 runs it so: it fails)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fl.job import FedJob, ScriptRunner
from fl.server.app import FLServer, reserved_rpc_workers
from fl.server.jobs import TERMINAL
from fl.site.agent import SiteAgent
from fl.site.loops import SharedLoops
from fl.transport import make_channel
from fl.workflows.fedavg import FedAvg

pytestmark = pytest.mark.timeout(600)
FIXTURES = Path(__file__).parent / "fixture_jobs"
SITES = 40
WORKERS = 16


def _job(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FedAvg over all SITES sites, one round, a script per task: every site must get its StartJob and its task
    through polls that are refused for up to BUSY_RETRY_MAX_S at a time."""
    monkeypatch.chdir(FIXTURES)
    monkeypatch.syspath_prepend(str(FIXTURES))
    from src.models import FlatModel

    job = FedJob(name="many-sites", min_clients=SITES)
    job.to(FedAvg(num_clients=SITES, num_rounds=1, min_clients=SITES, round_timeout=300.0, seed=5), "server")
    job.to(FlatModel(16), "server")
    job.to_clients(ScriptRunner(script="src/plus_one.py", framework="numpy", launch_once=False))
    return job.export_job(folder)


def test_heartbeats_and_transfers_are_served_while_polls_park_and_a_job_on_40_sites_finishes(tmp_path, monkeypatch):
    folder = _job(tmp_path / "export", monkeypatch)
    server = FLServer(
        tmp_path / "server", host="127.0.0.1", port=0, heartbeat_interval=1.0, lost_after=10.0, max_workers=WORKERS
    )
    parkable = WORKERS - reserved_rpc_workers(WORKERS)
    if os.environ.get("FL_TEST_NO_POLL_RESERVE") == "1":  # the control: every worker may hold a poll
        server.registry.max_parked_polls = parkable = WORKERS
    lost: list[str] = []
    server.registry.on_site_lost(lambda site, reason: lost.append(f"{site}: {reason}"))
    port = server.start()
    loops = SharedLoops()
    channels = [make_channel(f"127.0.0.1:{port}", tls=None) for _ in range(2)]
    agents = [
        SiteAgent(f"site-{i}", f"127.0.0.1:{port}", tmp_path / f"site-{i}", channel=channels[i % 2], poll_wait=30.0)
        for i in range(1, SITES + 1)
    ]
    try:
        for agent in agents:
            agent.start(loops)
        deadline = time.monotonic() + 60
        while len(server.registry.connected_sites()) < SITES:
            assert time.monotonic() < deadline, f"{len(server.registry.connected_sites())} of {SITES} sites joined"
            time.sleep(0.1)
        time.sleep(12.0)  # longer than lost_after: heartbeats must have been served meanwhile
        assert server.registry.parked_peak == parkable, "polls parked past the reserve, or never filled it"
        assert server.registry.polls_refused > 0
        assert not lost, lost
        assert len(server.registry.connected_sites()) == SITES

        staging = Path(tempfile.mkdtemp(dir=server.staging_dir))
        shutil.copytree(folder, staging / "job")
        record = server.jobs.submit(staging / "job")
        done = threading.Event()
        deadline = time.monotonic() + 400
        while record.status not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {record.status}: {record.message}"
            server.jobs.wait(record.job_id, 1.0)
        done.set()
        assert record.status == "finished", record.message
        assert not lost, lost  # every site stayed alive through job start (40 app downloads) and 40 uploads
        assert server.registry.parked_peak == parkable
        started = [a.name for a in agents if (a.workspace / record.job_id / "app").is_dir()]
        assert len(started) == SITES, f"only {len(started)} sites got the job (its StartJob directive)"
    finally:
        for agent in agents:
            agent.stop("test over")
        loops.stop()
        for channel in channels:
            channel.close()
        server.stop()
