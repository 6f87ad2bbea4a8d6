"""The upload manager's limits: one live upload per site and task, a spool budget per site, resume intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fl.server.transfers import HEADER_ALLOWANCE, SPOOL_MODELS_PER_SITE, TransferError, UploadManager, site_spool_limit

MiB = 2**20


def _begin(manager: UploadManager, upload_id: str, **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "upload_id": upload_id,
        "site": "site-1",
        "job_id": "job",
        "task_id": "task-a",
        "offset": 0,
        "total_size": 4 * MiB,
        "checksum": "",
        "expected": None,
        "max_bytes": 64 * MiB,
        "site_limit": 64 * MiB,
    }
    args.update(overrides)
    return manager.begin(**args)


def _spool_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_a_new_upload_id_for_the_same_task_replaces_the_old_and_deletes_its_spool(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    first = _begin(manager, "first")
    manager.write(first, b"x" * MiB)
    manager.pause(first)
    assert first.path.exists()
    second = _begin(manager, "second")
    assert not first.path.exists() and second.path.exists()
    assert manager.status("first", "site-1") is None
    with pytest.raises(TransferError) as refused:
        manager.write(first, b"x")  # a stream of the old upload still going
    assert refused.value.code == "ABORTED" and "replaced by upload second" in str(refused.value)
    with pytest.raises(TransferError) as gone:
        _begin(manager, "first", offset=MiB)
    assert gone.value.code == "FAILED_PRECONDITION"


def test_a_complete_upload_not_yet_submitted_is_replaced_too(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    done = _begin(manager, "done", total_size=3)
    manager.write(done, b"abc")
    assert done.complete
    _begin(manager, "again", total_size=3)
    assert not done.path.exists()
    with pytest.raises(TransferError) as taken:
        manager.take("done", site="site-1", job_id="job", task_id="task-a")
    assert taken.value.code == "NOT_FOUND"


def test_dozens_of_uploads_for_one_task_leave_one_spool_file(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    for i in range(40):
        upload = _begin(manager, f"u{i}", total_size=MiB)
        manager.write(upload, b"y" * (MiB if i % 2 else MiB // 2))  # complete and partial in turn
        manager.pause(upload)
        assert len(list((tmp_path / "spool").iterdir())) == 1
        assert _spool_bytes(tmp_path / "spool") <= MiB
    assert manager.spooled_bytes("site-1") == MiB


def test_uploads_of_other_sites_and_tasks_are_not_replaced(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    mine = _begin(manager, "mine")
    theirs = _begin(manager, "theirs", site="site-2")
    other_task = _begin(manager, "other", task_id="task-b")
    assert mine.path.exists() and theirs.path.exists() and other_task.path.exists()


def test_a_site_past_its_spool_limit_gets_resource_exhausted_naming_it_and_the_limit(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    _begin(manager, "a", task_id="task-a", total_size=40 * MiB, site_limit=64 * MiB)
    with pytest.raises(TransferError) as refused:
        _begin(manager, "b", task_id="task-b", total_size=30 * MiB, site_limit=64 * MiB)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    message = str(refused.value)
    assert "site site-1" in message and str(30 * MiB) in message and str(64 * MiB) in message
    assert str(40 * MiB) in message  # what it already holds
    assert len(list((tmp_path / "spool").iterdir())) == 1  # nothing half-made
    # Another site is not affected, and replacing its own upload of task-a is not counted twice.
    _begin(manager, "c", site="site-2", task_id="task-b", total_size=30 * MiB, site_limit=64 * MiB)
    _begin(manager, "a2", task_id="task-a", total_size=60 * MiB, site_limit=64 * MiB)


def test_the_site_spool_limit_is_two_models_plus_header_room():
    assert SPOOL_MODELS_PER_SITE == 2
    assert site_spool_limit(64 * MiB) == 128 * MiB + HEADER_ALLOWANCE


def test_resume_of_a_cut_upload_keeps_its_bytes_and_is_not_counted_against_the_limit(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    upload = _begin(manager, "cut", total_size=6, site_limit=6)
    manager.write(upload, b"abc")
    manager.pause(upload)
    again = _begin(manager, "cut", total_size=6, offset=3, site_limit=6)
    assert again is upload
    manager.write(again, b"def")
    taken = manager.take("cut", site="site-1", job_id="job", task_id="task-a")
    assert taken.path.read_bytes() == b"abcdef"


def test_discarding_a_task_stops_its_streams_and_deletes_their_files(tmp_path):
    manager = UploadManager(tmp_path / "spool")
    upload = _begin(manager, "late")
    manager.write(upload, b"z" * 10)
    manager.discard_task("task-a")
    assert not upload.path.exists() and upload.handle is None
    with pytest.raises(TransferError) as refused:
        manager.write(upload, b"z")
    assert refused.value.code == "ABORTED"
    assert _spool_bytes(tmp_path / "spool") == 0


def test_idle_uploads_expire_but_active_ones_do_not(tmp_path, monkeypatch):
    manager = UploadManager(tmp_path / "spool", stale_after=100.0)
    idle = _begin(manager, "idle", task_id="task-a")
    busy = _begin(manager, "busy", task_id="task-b")
    idle.active -= 1000
    busy.active -= 1000
    manager.write(busy, b"1")  # activity, however long ago the upload began
    _begin(manager, "new", task_id="task-c")
    assert not idle.path.exists() and manager.status("idle", "site-1") is None
    assert busy.path.exists() and manager.status("busy", "site-1") is busy


def test_a_large_stream_that_ends_gives_memory_back_and_a_cut_one_releases_its_file(tmp_path, monkeypatch):
    import fl.server.transfers as transfers

    calls: list[bool] = []
    monkeypatch.setattr(transfers, "release_memory", lambda collect=True: calls.append(collect) or True)
    manager = UploadManager(tmp_path / "spool")
    upload = _begin(manager, "cut", total_size=transfers.RELEASE_AFTER_BYTES * 2)
    manager.write(upload, b"q" * 10)
    manager.stream_ended(upload, streamed=10)
    assert upload.handle is None and calls == []
    manager.stream_ended(upload, streamed=transfers.RELEASE_AFTER_BYTES)
    assert calls == [False]  # no garbage collection in an RPC thread, only malloc_trim
