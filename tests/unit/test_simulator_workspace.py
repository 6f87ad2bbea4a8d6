"""The simulator's workspace: a lock for the run's life, earlier runs kept, killed runs' jobs closed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl.fsutil import atomic_write_json, read_json
from fl.server.jobstore import JobError
from fl.simulator import LOCK, WorkspaceBusy, _link_latest, _prepare_workspace, workspace_lock

HOLD = "import sys, time; from pathlib import Path; from fl.simulator import workspace_lock\n" \
    "with workspace_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"  # fmt: skip


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the lock of ``tmp_path / 'ws'``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ws")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_second_process_is_refused_naming_the_pid_that_holds_the_workspace(tmp_path, holder):
    with pytest.raises(WorkspaceBusy) as caught, workspace_lock(tmp_path / "ws"):
        pass
    assert f"is in use by another simulation (PID {holder.pid})" in str(caught.value)


def test_the_lock_is_free_again_when_its_holder_dies(tmp_path, holder):
    holder.kill()
    holder.wait(10)
    with workspace_lock(tmp_path / "ws"):
        assert (tmp_path / "ws" / LOCK).read_text().strip().isdigit()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    ws = tmp_path / "ws"
    with workspace_lock(ws), workspace_lock(ws):  # simulator_run holds it around simulate()
        pass
    with workspace_lock(ws):  # and it was released
        pass


def test_simulator_run_refuses_a_busy_workspace_before_writing_into_it(tmp_path, holder, monkeypatch):
    from fl.job import FedJob, ScriptRunner

    (tmp_path / "train.py").write_text("print('never runs')\n")
    monkeypatch.chdir(tmp_path)
    job = FedJob(name="busy", min_clients=1)
    job.to(ScriptRunner(script="train.py"), "site-1")
    assert job.simulator_run(tmp_path / "ws") == 2
    assert not (tmp_path / "ws" / "job_config").exists()


def test_a_foreign_server_workspace_is_refused(tmp_path):
    (tmp_path / "server" / "jobs").mkdir(parents=True)
    with pytest.raises(JobError, match="not a simulation's"), workspace_lock(tmp_path):
        pass


def test_a_job_left_running_by_a_killed_run_is_closed_and_earlier_results_stay(tmp_path):
    jobs = tmp_path / "server" / "jobs"
    for job_id, status in (("old-done", "finished"), ("old-killed", "running")):
        atomic_write_json(jobs / job_id / "status.json", {"job_id": job_id, "status": status, "ended": 0.0})
    (jobs / "old-done" / "FL_global_model.pt").write_bytes(b"results")
    (tmp_path / ".fl-simulation").write_text("")
    _prepare_workspace(tmp_path)
    assert read_json(jobs / "old-done" / "status.json")["status"] == "finished"
    assert (jobs / "old-done" / "FL_global_model.pt").read_bytes() == b"results"
    killed = read_json(jobs / "old-killed" / "status.json")
    assert killed["status"] == "aborted" and "its simulation ended before the job did" in killed["message"]
    assert killed["ended"] > 0


def test_latest_points_at_the_newest_run_relatively(tmp_path):
    for job_id in ("first", "second"):
        (tmp_path / "server" / "jobs" / job_id).mkdir(parents=True)
        _link_latest(tmp_path, tmp_path / "server" / "jobs" / job_id)
    assert os.readlink(tmp_path / "latest") == "server/jobs/second"  # the workspace can move
