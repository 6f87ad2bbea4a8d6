"""The simulator end to end: hello-pt, exported jobs, big models, crashing scripts, bad updates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl.fsutil import read_json
from fl.simulator import simulate
from tests.integration.conftest import run_dir
from tests.integration.federation import start_simulation, wait_for

REPO = Path(__file__).resolve().parents[2]
HELLO_PT = REPO / "jobs" / "hello-pt" / "job.py"
pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["FL_DATA_ROOT"] = "/nonexistent-fl-data"  # never find or download CIFAR10 in tests
    return env


def test_hello_pt_tiny_job_writes_every_result(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(HELLO_PT),
            "--workspace",
            str(tmp_path),
            "--train-size",
            "64",
            "--test-size",
            "64",
            "--dataset",
            "synthetic",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = run_dir(tmp_path)
    for name in ("FL_global_model.pt", "best_FL_global_model.pt", "validation.json"):
        assert (job / name).is_file(), name
    for site in ("site-1", "site-2"):
        assert list((job / "tb_events" / site).glob("events.out.tfevents.*")), site
        site_log = (job / "logs" / f"{site}.log").read_text()
        assert "round 2 epoch 2/2" in site_log
        assert "final validation: accuracy of the global model" in site_log  # what the e2e suite reads
    checkpoint = torch.load(job / "FL_global_model.pt", weights_only=True)
    assert set(checkpoint["model"]) >= {"conv1.weight", "fc3.bias"} and checkpoint["round"] == 1
    versions = [m["model_version"] for m in read_json(job / "validation.json")["models"]]
    assert versions == [0, 1, 2]
    assert "hello-pt finished" in proc.stdout and "best model:" in proc.stdout


@pytest.mark.slow
def test_hello_pt_default_run_learns(tmp_path):
    """The README's run: 2 sites, 2 rounds, offline data; accuracy after round 2 beats round 1."""
    proc = subprocess.run(
        [sys.executable, str(HELLO_PT), "--workspace", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = read_json(run_dir(tmp_path) / "validation.json")["models"]
    accuracy = {m["model_version"]: m["aggregate"]["accuracy"] for m in models}
    assert accuracy[2] > accuracy[1] > accuracy[0], accuracy
    assert "offline synthetic dataset" in (run_dir(tmp_path) / "logs" / "site-1.log").read_text()


def test_exported_job_runs_with_fl_simulate(make_job, tmp_path):
    folder = make_job(rounds=2).export_job(tmp_path / "export")
    proc = subprocess.run(
        [sys.executable, "-m", "fl", "simulate", str(folder), "-n", "2", "-w", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), 2.0))


def test_64_mib_model_moves_exactly(make_job, tmp_path):
    numel = 64 * 2**20 // 4
    job = make_job(numel=numel, rounds=2, framework="pytorch")
    assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    final = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert final.numel() == numel and bool((final == 2.0).all())


def test_crashing_script_fails_the_job_fast_naming_site_and_output(make_job, tmp_path, capsys):
    job = make_job(rounds=3, script_args={"site-2": "--crash-in-round 1"}, round_timeout=600)
    started = time.monotonic()
    code = simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False)
    elapsed = time.monotonic() - started
    assert code == 1
    assert elapsed < 60, f"took {elapsed:.0f} s: a crash must not wait out the 600 s round deadline"
    status = read_json(run_dir(tmp_path / "ws") / "status.json")
    assert status["status"] == "failed"
    assert "site-2" in status["message"] and "ZeroDivisionError" in status["message"]
    assert "about to fail on purpose" in status["message"]


def test_non_finite_update_is_refused_and_the_round_goes_on(make_job, tmp_path):
    job = make_job(rounds=2, min_clients=1, script_args={"site-2": "--nan"})
    assert simulate(job.export_job(tmp_path / "export"), tmp_path / "ws", progress=False) == 0
    final = torch.load(run_dir(tmp_path / "ws") / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), 2.0))
    log = (run_dir(tmp_path / "ws") / "logs" / "site-2.log").read_text()
    assert "non-finite" in log or "non-finite" in json.dumps(read_json(run_dir(tmp_path / "ws") / "status.json"))


def test_ctrl_c_stops_the_simulation_and_every_process_it_started(make_job, tmp_path):
    import signal

    import psutil

    job = make_job(rounds=3, script_args={s: "--sleep 60" for s in ("site-1", "site-2")})
    folder = job.export_job(tmp_path / "export")
    sim = start_simulation(folder, tmp_path / "ws", tmp_path)
    try:
        wait_for(lambda: sim.log().count("task train received") >= 2, 120, "both sites to receive their task")
        assert sim.proc is not None
        children = psutil.Process(sim.proc.pid).children(recursive=True)
        assert len(children) >= 2  # the two training scripts
        sim.proc.send_signal(signal.SIGINT)
        assert sim.proc.wait(60) == 130
        time.sleep(0.5)
        alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"still running after Ctrl-C: {alive}"
        assert "interrupted: stopping the job" in sim.log()
    finally:
        sim.stop()
