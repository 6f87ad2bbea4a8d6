"""The simulator's choice between one script for the whole job and a script run per task."""

from __future__ import annotations

import json

import pytest

from fl.components.script_executor import ScriptExecutor, choose_launch_once, job_launch_once, launch_mode_line


@pytest.mark.parametrize(
    ("job", "sites", "threads", "launch_once"),
    [
        (None, 2, None, True),  # every site trains at once: today's behaviour
        (None, 2, 2, True),
        (None, 2, 4, True),
        (None, 200, 2, False),  # more sites than train at once: per task
        (None, 3, 1, False),
        (True, 200, 2, True),  # the job's setting wins either way
        (False, 2, None, False),
    ],
)
def test_the_mode_follows_the_job_then_sites_against_threads(job, sites, threads, launch_once):
    chosen, reason = choose_launch_once(job, sites, threads)
    assert chosen is launch_once
    assert reason


def test_the_per_task_line_says_why_and_that_memory_state_does_not_survive():
    chosen, reason = choose_launch_once(None, 200, 2)
    line = launch_mode_line(chosen, reason)
    assert "per task" in line and "200 sites and threads=2" in line and "flare.get_state()" in line
    assert "the job sets launch_once=True" in launch_mode_line(*choose_launch_once(True, 200, 2))
    assert "reused worker process" in launch_mode_line(chosen, reason, reused=True)
    assert "a fork of its own" in line


def _job(tmp_path, args):
    config = tmp_path / "job" / "app_site-1" / "config"
    config.mkdir(parents=True)
    executor = {"path": "fl.components.script_executor.ScriptExecutor", "args": args}
    (config / "config_fed_client.json").write_text(json.dumps({"executors": [{"tasks": ["*"], "executor": executor}]}))
    return tmp_path / "job"


def test_the_job_setting_is_read_from_the_exported_site_config(tmp_path):
    assert job_launch_once(_job(tmp_path / "a", {"task_script_path": "t.py", "launch_once": False})) is False
    assert job_launch_once(_job(tmp_path / "b", {"task_script_path": "t.py"})) is None


def test_script_executor_takes_launch_once_true_false_or_none_only():
    assert ScriptExecutor(task_script_path="t.py").launch_once is None
    assert ScriptExecutor(task_script_path="t.py", launch_once=False).launch_once is False
    with pytest.raises(ValueError, match="launch_once must be true, false or null, got 'no'"):
        ScriptExecutor(task_script_path="t.py", launch_once="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("launch_once", [True, False, None])
def test_script_runners_launch_once_reaches_the_exported_executor(tmp_path, monkeypatch, launch_once):
    from pathlib import Path

    from fl.job import FedJob, ScriptRunner
    from fl.workflows.fedavg import FedAvg

    monkeypatch.chdir(Path(__file__).resolve().parents[2] / "jobs" / "hello-pt")
    job = FedJob(name="modes", min_clients=1, key_metric=None)
    job.to(FedAvg(num_clients=1, num_rounds=1), "server")
    job.to(ScriptRunner(script="src/hello-pt_cifar10_fl.py", launch_once=launch_once), "site-1")
    folder = job.export_job(tmp_path)
    assert job_launch_once(folder) is launch_once
