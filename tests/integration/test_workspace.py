"""Reusing a simulator workspace: a second run keeps the first's results; a concurrent one is refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl.fsutil import read_json
from tests.integration.probe_job import export_probe_job

pytestmark = pytest.mark.timeout(400)
RESULTS = ("FL_global_model.pt", "best_FL_global_model.pt", "validation.json", "best_model.json")


def _command(folder: Path, ws: Path) -> list[str]:
    return [sys.executable, "-m", "fl", "simulate", str(folder), "-w", str(ws)]


def _job_folders(ws: Path) -> list[Path]:
    return sorted((ws / "server" / "jobs").iterdir(), key=lambda p: read_json(p / "status.json")["submitted"])


def test_a_second_run_keeps_the_first_runs_results(monkeypatch, tmp_path):
    ws = tmp_path / "ws"
    first = export_probe_job(monkeypatch, tmp_path / "one", rounds=1)
    second = export_probe_job(monkeypatch, tmp_path / "two", rounds=2)
    proc = subprocess.run(_command(first, ws), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run1] = _job_folders(ws)
    before = {name: (run1 / name).read_bytes() for name in RESULTS}
    proc = subprocess.run(_command(second, ws), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run1_again, run2 = _job_folders(ws)
    assert run1_again == run1
    assert {name: (run1 / name).read_bytes() for name in RESULTS} == before
    assert torch.load(run1 / "FL_global_model.pt", weights_only=True)["model_version"] == 1
    assert torch.load(run2 / "FL_global_model.pt", weights_only=True)["model_version"] == 2
    assert (ws / "latest").resolve() == run2
    assert str(run2) in proc.stdout  # the summary points at this run's folder


def test_a_concurrent_run_is_refused_naming_the_first_and_the_first_completes(monkeypatch, tmp_path):
    ws = tmp_path / "ws"
    slow = export_probe_job(monkeypatch, tmp_path / "slow", script_args={s: "--sleep 2" for s in ("site-1", "site-2")})
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(_command(slow, ws), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "task train received" not in log.read_text():
            assert time.monotonic() < deadline and first.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        second = subprocess.run(_command(slow, ws), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by another simulation (PID {first.pid})" in second.stderr
        assert first.wait(240) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    [run] = _job_folders(ws)
    assert read_json(run / "status.json")["status"] == "finished"
    assert all((run / name).is_file() for name in RESULTS)
    assert "FileNotFoundError" not in log.read_text()
