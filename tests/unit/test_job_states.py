"""Job states on disk when writes fail: progress is best effort, a terminal state is durable and a
restarted server agrees with it; temp files of interrupted writes are swept under the workspace lock; a job
that ends takes back what it had queued for a site that has not polled since, but its end."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fl.server.jobs as jobs
from fl.fsutil import LockHeld, atomic_path, atomic_write_json, lock_exclusively, sweep_atomic_temps
from fl.proto import federation_pb2 as pb
from fl.server.jobs import JobManager, JobRecord, JobRun
from fl.server.jobstore import read_job
from fl.server.sites import SiteRegistry
from fl.server.tasks import TaskBroker
from fl.server.transfers import BlobStore, UploadManager


def _manager(workspace: Path) -> JobManager:
    registry = SiteRegistry()
    blobs = BlobStore()
    broker = TaskBroker(registry, blobs, UploadManager(workspace / "spool"))
    return JobManager(workspace, registry, broker, blobs)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def manager(workspace: Path) -> Iterator[JobManager]:
    m = _manager(workspace)
    yield m
    m.stop()


def _running_job(manager: JobManager, job_id: str = "job-1") -> JobRecord:
    record = JobRecord(job_id=job_id, name="test", status="running", num_rounds=4)
    manager.job_dir(job_id).mkdir(parents=True)
    manager.records[job_id] = record
    manager.save_record(record)
    return record


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Any, obj: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(jobs, "atomic_write_json", refuse)


def _status_on_disk(manager: JobManager, job_id: str) -> str:
    status: str = json.loads((manager.job_dir(job_id) / "status.json").read_text())["status"]
    return status


def test_a_progress_write_that_fails_is_kept_in_memory_and_raises_nothing(manager, monkeypatch):
    record = _running_job(manager)
    _disk_full(monkeypatch)
    assert manager.save_record(record) is not None
    record.round = 3
    manager.save_record(record)  # logged once, not raised
    assert manager.records["job-1"].round == 3
    assert _status_on_disk(manager, "job-1") == "running"


def test_a_failed_job_whose_status_json_cannot_be_written_stays_failed_after_a_restart(workspace, monkeypatch):
    first = _manager(workspace)
    record = _running_job(first)
    with monkeypatch.context() as patch:
        _disk_full(patch)
        first.set_status(record, "failed", "[Errno 28] No space left on device: 'models/global-r0003.safetensors'")
    assert record.status == "failed"
    assert "it stays failed after a restart" in record.message
    assert _status_on_disk(first, "job-1") == "running"  # the disk was full
    first.stop()

    restarted = _manager(workspace)
    try:
        assert restarted.records["job-1"].status == "failed"
        assert restarted._queue == []  # not resumed
        assert _status_on_disk(restarted, "job-1") == "failed"  # rewritten to agree
    finally:
        restarted.stop()


def test_a_terminal_state_that_cannot_be_saved_at_all_says_a_restart_would_resume_it(manager, monkeypatch):
    record = _running_job(manager)
    _disk_full(monkeypatch)
    monkeypatch.setattr(jobs, "create_empty", lambda path: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    manager.set_status(record, "failed", "boom")
    assert record.status == "failed" and "a restarted server would resume it" in record.message


def test_a_job_whose_running_status_was_never_written_still_resumes_from_its_state(workspace):
    first = _manager(workspace)
    record = _running_job(first)
    record.status = "waiting"
    first.save_record(record)
    atomic_write_json(first.job_dir("job-1") / "state.json", {"next_round": 2})
    first.stop()
    restarted = _manager(workspace)
    try:
        assert restarted._queue == [("job-1", True)]
    finally:
        restarted.stop()


def test_a_second_server_on_a_workspace_in_use_is_refused_naming_the_holder(manager, workspace):
    with pytest.raises(LockHeld, match=r"pid \d+"):
        _manager(workspace)


def test_server_start_sweeps_temp_files_of_interrupted_writes_and_nothing_else(workspace):
    job = workspace / "jobs" / "job-1"
    (job / "job" / "app").mkdir(parents=True)
    planted = [job / ".FL_global_model.pt.0123456789ab.tmp", job / ".status.json.abcdef012345.tmp"]
    kept = [
        job / "job" / "app" / ".data.0123456789ab.tmp",  # the admin's submitted files
        job / ".notes.tmp",
        job / "model.0123456789ab.tmp",
        job / ".x.0123456789AB.tmp",
    ]
    for path in planted + kept:
        path.write_bytes(b"x")
    m = _manager(workspace)
    m.stop()
    assert [p for p in planted if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []


def test_sweep_removes_what_a_writer_killed_mid_write_leaves_and_follows_no_symlink(tmp_path):
    code = (
        "import os, signal, sys; from fl.fsutil import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ws" / "state.json")], timeout=60)
    leftover = list((tmp_path / "ws").iterdir())
    assert len(leftover) == 1 and leftover[0].name.startswith(".state.json.")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ".keep.0123456789ab.tmp"
    victim.write_bytes(b"x")
    (tmp_path / "ws" / "link").symlink_to(outside, target_is_directory=True)
    assert sweep_atomic_temps(tmp_path / "ws") == leftover
    assert victim.exists()


def test_a_write_that_fails_names_the_file_it_could_not_write(tmp_path):
    target = tmp_path / "models" / "global.safetensors"
    with pytest.raises(OSError, match=r"global\.safetensors"), atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(target.parent.iterdir()) == []


def test_a_lock_is_released_when_its_descriptor_closes(tmp_path):
    import os

    fd = lock_exclusively(tmp_path / "lock")
    with pytest.raises(LockHeld):
        lock_exclusively(tmp_path / "lock")
    os.close(fd)
    os.close(lock_exclusively(tmp_path / "lock"))


def test_an_ended_job_leaves_a_site_that_has_not_polled_since_its_end_and_not_its_start_or_task(
    manager, tmp_path, monkeypatch
):
    """A site told to come back later (a refused poll) can miss a whole short job: at its next poll it must
    not start a job that is over, whose app the server no longer offers, nor run its task."""
    from fl.job import FedJob, ScriptRunner
    from fl.workflows.fedavg import FedAvg

    monkeypatch.chdir(Path(__file__).resolve().parents[2] / "jobs" / "hello-pt")
    job = FedJob(name="short", min_clients=1, key_metric=None)
    job.to(FedAvg(num_clients=1, num_rounds=1), "server")
    job.to_clients(ScriptRunner(script="src/hello-pt_cifar10_fl.py"))
    spec = read_job(job.export_job(tmp_path / "export"))
    record = _running_job(manager)
    run = JobRun(manager, record, spec, resume=False)
    away = manager.registry.register("site-2", [], True)
    other = pb.PollReply(start_job=pb.StartJob(job_id="job-2"))
    run.participants = ["site-2"]
    run._start_on_site("site-2")
    manager.registry.enqueue("site-2", pb.PollReply(task=pb.Task(job_id="job-1", name="train")))
    manager.registry.enqueue("site-2", other)
    run._end_on_sites("finished", "")
    got = [manager.registry.poll(away.session_id, 0.0) for _ in range(3)]
    assert [reply.WhichOneof("directive") for reply in got] == ["start_job", "end_job", None]
    assert got[0].start_job.job_id == "job-2"  # another job's start stays
    assert got[1].end_job.job_id == "job-1" and got[1].end_job.status == "finished"
