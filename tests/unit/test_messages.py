"""Failure messages say what happened, to whom, and what to change (the server's round engine,
against a real TaskBroker and SiteRegistry in memory: no network)."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fl.log import adapter
from fl.proto import federation_pb2 as pb
from fl.server.jobs import JobLogs, JobRun
from fl.server.sites import SiteRegistry
from fl.server.tasks import JobCommunicator, TaskBroker
from fl.server.transfers import BlobStore, UploadManager
from fl.simulator import _SitesHost, _summary
from fl.workflows.base import RoundFailed, TaskResult, TaskSpec
from fl.workflows.fedavg import FedAvg
from tests.unit.test_fedavg import Context, FakePersistor, plus_one
from tests.unit.test_round_numbering import captured

SITES = ("site-1", "site-2")
JOB = "job-1"


class Round:
    """A round of a metrics-only task on the server's JobCommunicator, run in a thread."""

    def __init__(self, tmp_path: Path, **communicator: Any) -> None:
        self.registry = SiteRegistry()
        self.broker = TaskBroker(self.registry, BlobStore(), UploadManager(tmp_path / "spool"))
        self.sessions = {s: self.registry.register(s, [], True) for s in SITES}
        self.comm = JobCommunicator(self.broker, JOB, threading.Event(), adapter("fl.test"), **communicator)
        self.error: BaseException | None = None
        self.results: list[TaskResult] = []
        self.thread: threading.Thread | None = None

    def start(self, *, min_responses: int, timeout: float, refuse: str | None = None) -> None:
        def on_result(result: TaskResult) -> None:
            if result.site == refuse:
                raise ValueError("non-finite values in 'w'")

        task = TaskSpec(name="train", round=0, num_rounds=2, expect_params=False)

        def run() -> None:
            try:
                self.results = self.comm.broadcast_and_wait(
                    task, list(SITES), min_responses=min_responses, timeout=timeout, on_result=on_result
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.task_ids = {s: self.registry.poll(self.sessions[s].session_id, 10).task.task_id for s in SITES}

    def submit(self, site: str) -> tuple[bool, str]:
        request = pb.SubmitResultRequest(
            job_id=JOB, task_id=self.task_ids[site], metrics_json=json.dumps({"accuracy": 0.5})
        )
        return self.broker.submit(site, request)

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def records() -> Iterator[list[Any]]:
    with captured() as got:
        yield got


def test_a_refused_result_does_not_make_the_other_site_look_timed_out(tmp_path, records):
    rnd = Round(tmp_path)
    rnd.start(min_responses=2, timeout=3600, refuse="site-1")
    accepted, message = rnd.submit("site-1")
    assert not accepted and "non-finite values" in message
    rnd.join()
    error = str(rnd.error)
    assert isinstance(rnd.error, RoundFailed)
    assert "site-1: result refused: non-finite values in 'w'" in error
    assert "site-2: still working when the round failed" in error
    assert "no result within" not in error
    lines = [r.getMessage() for r in records]
    assert not [line for line in lines if "no train result within" in line]
    assert [line for line in lines if "train task of round 1/2 failed while site-2 was still working" in line]


def test_a_result_after_the_round_failed_is_told_why_the_round_ended(tmp_path):
    rnd = Round(tmp_path)
    rnd.start(min_responses=2, timeout=3600, refuse="site-1")
    rnd.submit("site-1")
    rnd.join()
    accepted, message = rnd.submit("site-2")
    assert not accepted
    assert "not pending (the round is over or it is unknown)" not in message
    assert message == (
        f"task {rnd.task_ids['site-2']} is no longer pending: the train task of round 1/2 had already ended: "
        "it could no longer get the 2 results it needs (site-1: result refused: non-finite values in 'w')"
    )


def test_a_site_silent_until_the_deadline_is_reported_as_such(tmp_path):
    rnd = Round(tmp_path)
    rnd.start(min_responses=2, timeout=1.0)
    assert rnd.submit("site-1") == (True, "accepted")
    rnd.join()
    assert "site-2: no result within 1 s (round_timeout)" in str(rnd.error)
    accepted, message = rnd.submit("site-2")
    assert not accepted and "its 1 s deadline (round_timeout) passed with 1 results (2 needed)" in message


def test_a_site_whose_uploads_the_server_refused_is_reported_with_the_refusal_at_the_deadline(tmp_path):
    rnd = Round(tmp_path)
    rnd.start(min_responses=2, timeout=1.0)
    assert rnd.submit("site-1") == (True, "accepted")
    full = "the server cannot store the upload: No space left on device"
    rnd.broker.note_refusal(site="site-2", job_id=JOB, task_id=rnd.task_ids["site-2"], reason=full)
    rnd.broker.note_refusal(site="site-1", job_id=JOB, task_id=rnd.task_ids["site-2"], reason="not site-1's task")
    rnd.broker.note_refusal(site="site-2", job_id=JOB, task_id="no-such-task", reason="not pending")
    rnd.join()
    assert str(rnd.error).endswith(
        f"site-2: no result within 1 s (round_timeout); an upload of its result was refused: {full}"
    ), str(rnd.error)
    assert "not site-1's task" not in str(rnd.error) and "not pending" not in str(rnd.error)


def test_a_waiting_round_says_whom_it_waits_for_and_what_they_last_did(tmp_path, records):
    rnd = Round(tmp_path, status_interval=0.1, describe_site=lambda site: f"last output of {site}")
    rnd.start(min_responses=1, timeout=1.0)
    rnd.submit("site-1")
    rnd.join()
    assert [r.site for r in rnd.results] == ["site-1"]
    waiting = [r.getMessage() for r in records if "waiting" in r.getMessage()]
    assert waiting, [r.getMessage() for r in records]
    pattern = (
        r"train task of round 1/2: waiting \d+ s so far for site-2 \(1 of 2 answered; deadline in \d+ s\)\. "
        r"site-2: last output of site-2"
    )
    assert re.fullmatch(pattern, waiting[-1]), waiting[-1]


def test_site_description_names_its_last_output_and_heartbeat(tmp_path):
    registry = SiteRegistry()
    registry.register("site-2", [], True)
    logs = JobLogs(tmp_path / "logs")
    logs.append("site-2", ["12:00:00 site-2: round 1 epoch 1/2 loss 2.3"])
    run = SimpleNamespace(failed_sites={}, logs=logs, manager=SimpleNamespace(registry=registry))
    text = JobRun.describe_site(run, "site-2")  # type: ignore[arg-type]
    assert re.fullmatch(
        r"last output \d+ s ago: '12:00:00 site-2: round 1 epoch 1/2 loss 2.3', connected, last heard \d+ s ago", text
    ), text
    assert JobRun.describe_site(run, "site-9") == "no output from its script yet, never registered"  # type: ignore[arg-type]


def _run_with_participants(participants: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        sites=participants, participants=participants, failed_sites={}, abort_event=threading.Event()
    )


def test_too_few_sites_for_fedavg_says_so_and_what_to_change(tmp_path):
    run = _run_with_participants(["a", "b"])
    ctx = Context(tmp_path, {"a": plus_one(), "b": plus_one()}, {"persistor": FakePersistor({"w": np.zeros(1)})})
    ctx.wait_for_sites = lambda count, timeout: JobRun.wait_for_sites(run, count, timeout)  # type: ignore[method-assign]
    with pytest.raises(RoundFailed) as caught:
        FedAvg(num_clients=3, num_rounds=2).run(ctx)
    message = str(caught.value)
    assert message == (
        "FedAvg (num_clients=3, so min_clients=3) cannot run round 1/2: the job runs on 2 sites (a, b), fewer than "
        "the 3 needed: lower the workflow's min_clients/num_clients or run the job on more sites"
    )
    assert "failed on 0" not in message


def test_sites_whose_job_failed_are_named_with_their_reason(tmp_path):
    run = _run_with_participants(["a", "b"])
    run.failed_sites = {"b": "training script exited with code 1"}
    run.sites = ["a"]
    with pytest.raises(RoundFailed, match=r"failed on 1: b: training script exited with code 1"):
        JobRun.wait_for_sites(run, 2, 5)  # type: ignore[arg-type]


def test_a_site_process_that_exits_early_is_reported_as_such_not_as_a_connect_timeout(tmp_path):
    host = _SitesHost("127.0.0.1:1", tmp_path, list(SITES), None)
    host.commands = [[sys.executable, "-c", "import sys; sys.exit(3)", "--sites", "site-1,site-2"]]
    host.start()
    try:
        server = SimpleNamespace(registry=SimpleNamespace(connected_sites=lambda: []))
        problem = host.wait_registered(server, 120.0)  # type: ignore[arg-type]
    finally:
        host.stop(graceful=False)
    assert problem == (
        "the site process for site-1, site-2 exited with code 3 before its sites connected (its output is above)"
    )


def test_the_summary_says_why_there_is_no_best_model(tmp_path):
    from fl.fsutil import atomic_write_json
    from fl.server.jobs import JobRecord

    reason = "the sites sent no metrics with their results, so no model was scored"
    atomic_write_json(tmp_path / "best_model.json", {"key_metric": "accuracy", "model_version": None, "reason": reason})
    record = JobRecord(job_id="j", name="probe", status="finished", num_rounds=2, sites=["a"])
    assert f"  no best model: {reason}" in _summary(record, tmp_path, 1.0).splitlines()


def test_a_task_made_for_a_site_whose_job_already_failed_fails_at_once_not_at_its_deadline(tmp_path):
    """The site's failure can reach the server between the round choosing its sites and queuing its tasks."""
    rnd = Round(tmp_path)
    rnd.broker.fail_site("site-2", JOB, "the training script exited (code 2)")
    task = TaskSpec(name="train", round=0, num_rounds=2, expect_params=False)
    started = time.monotonic()
    with pytest.raises(RoundFailed, match=r"site-2: the training script exited \(code 2\)"):
        rnd.comm.broadcast_and_wait(task, list(SITES), min_responses=2, timeout=3600)
    assert time.monotonic() - started < 10
    # Another job's tasks, and this job's once the site runs it again, are sent as usual.
    rnd.broker.site_back("site-2", JOB)
    rnd.start(min_responses=2, timeout=3600)
    assert all(rnd.task_ids.values())
    assert rnd.submit("site-1") == (True, "accepted") and rnd.submit("site-2") == (True, "accepted")
    rnd.join()
    assert rnd.error is None and len(rnd.results) == 2
