"""Failure messages of real simulations say what happened: a hung site, a timeout, Ctrl-C, too few sites."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fl.fsutil import read_json
from tests.integration.federation import start_simulation
from tests.integration.probe_job import export_probe_job

pytestmark = pytest.mark.timeout(300)


def _simulate(folder: Path, ws: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(ws), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_a_hung_script_is_named_at_every_status_interval_and_the_timeout_says_it_ended_the_run(monkeypatch, tmp_path):
    folder = export_probe_job(monkeypatch, tmp_path / "export", script_args={"site-2": "--hang-in-round 0"})
    proc = _simulate(folder, tmp_path / "ws", "--status-interval", "1", "--timeout", "30")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    waiting = re.findall(r"train task of round 1/2: waiting (\d+) s so far for site-2 \(1 of 2 answered[^\n]*", output)
    assert len(waiting) >= 3, output[-3000:]
    assert [int(s) for s in waiting] == sorted(int(s) for s in waiting)
    last = re.findall(r"for site-2 \(1 of 2 answered; deadline in \d+ s\)\. site-2: ([^\n]*)", output)[-1]
    assert re.fullmatch(
        r"last output \d+ s ago: '[\d:]+ site-2: hanging on purpose', connected, last heard \d+ s ago", last
    )
    status = read_json((tmp_path / "ws" / "latest" / "status.json").resolve())
    assert status["status"] == "aborted"
    assert status["message"] == "the simulation did not finish within its timeout (30 s)"
    assert "aborted by admin" not in output


def test_ctrl_c_is_reported_as_an_interruption_not_an_admin_abort(monkeypatch, tmp_path):
    folder = export_probe_job(monkeypatch, tmp_path / "export", script_args={"site-1": "--hang-in-round 0"})
    sim = start_simulation(folder, tmp_path / "ws", tmp_path)
    try:
        sim.wait_for_log("hanging on purpose", 120)
        assert sim.proc is not None
        sim.proc.send_signal(signal.SIGINT)
        assert sim.proc.wait(60) == 130
    finally:
        sim.stop()
    status = read_json((tmp_path / "ws" / "latest" / "status.json").resolve())
    assert (status["status"], status["message"]) == ("aborted", "interrupted (Ctrl-C): the simulator stopped the job")
    assert "aborted by admin" not in sim.log()


def test_fedavg_asking_for_more_sites_than_the_job_has_says_what_to_change(monkeypatch, tmp_path):
    folder = export_probe_job(monkeypatch, tmp_path / "export", num_clients=3)
    proc = _simulate(folder, tmp_path / "ws")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert (
        "FedAvg (num_clients=3, so min_clients=3) cannot run round 1/2: the job runs on 2 sites (site-1, site-2), "
        "fewer than the 3 needed: lower the workflow's min_clients/num_clients or run the job on more sites" in output
    )
    assert "failed on 0" not in output
