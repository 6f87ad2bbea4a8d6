"""A full disk on the server is the server's error: an upload's refused piece is not counted (the
site's retry goes through once there is room) and a job submitted onto a full disk gets a clear
error and leaves no staging folder."""

from __future__ import annotations

import errno
import io
import logging
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import fl.server.transfers as transfers
from fl.proto import federation_pb2 as pb
from fl.server.service import AdminServicer
from fl.server.transfers import TransferError, UploadManager
from fl.tensors import write_tensors


class SmallDisk:
    """Stands in for ``open`` of spool files: writes succeed until ``free`` bytes are used up."""

    def __init__(self, free: int) -> None:
        self.free = free

    def open(self, path: Path, mode: str = "r", buffering: int = -1) -> SmallDisk._File:
        return SmallDisk._File(self, io.FileIO(path, "r+"))

    class _File:
        def __init__(self, disk: SmallDisk, raw: io.FileIO) -> None:
            self.disk, self.raw = disk, raw

        def seek(self, position: int) -> int:
            return self.raw.seek(position)

        def write(self, data: bytes | memoryview) -> int:
            if self.disk.free <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            taken = min(len(data), self.disk.free)
            self.disk.free -= taken
            return self.raw.write(bytes(data[:taken])) or 0

        def close(self) -> None:
            self.raw.close()


def _model(tmp_path: Path) -> tuple[bytes, Any]:
    layout = write_tensors(tmp_path / "m.safetensors", {"w": np.arange(4096, dtype=np.float32)})
    return (tmp_path / "m.safetensors").read_bytes(), layout


def _begin(manager: UploadManager, data: bytes, layout: Any, offset: int = 0) -> Any:
    return manager.begin(
        upload_id="u1",
        site="site-1",
        job_id="job",
        task_id="task",
        offset=offset,
        total_size=len(data),
        checksum="",
        expected=layout,
        max_bytes=len(data),
        site_limit=4 * len(data),
    )


def test_a_piece_the_full_disk_refused_is_not_counted_and_the_retry_completes(tmp_path, monkeypatch, caplog):
    data, layout = _model(tmp_path)
    disk = SmallDisk(free=len(data) // 2 + 100)  # room for part of the second piece only
    monkeypatch.setattr(transfers, "open", disk.open, raising=False)
    manager = UploadManager(tmp_path / "spool")
    upload = _begin(manager, data, layout)
    half = len(data) // 2
    manager.write(upload, data[:half])
    with caplog.at_level(logging.ERROR, logger="fl.server"), pytest.raises(TransferError) as full:
        manager.write(upload, data[half:])
    assert full.value.code == "RESOURCE_EXHAUSTED"
    assert str(full.value) == "the server cannot store the upload: No space left on device"
    assert "rejected" not in str(full.value) and upload.error is None
    assert "site-1: the server cannot store the upload" in caplog.text
    assert upload.received == half and upload.path.stat().st_size == half  # the partial piece is cut off
    manager.stream_ended(upload, streamed=half)

    disk.free = len(data)  # the operator makes room; the site resumes from what the server holds
    again = _begin(manager, data, layout, offset=upload.received)
    manager.write(again, data[half:])
    taken = manager.take("u1", site="site-1", job_id="job", task_id="task")
    assert taken.complete and taken.path.read_bytes() == data


class Aborted(Exception):
    def __init__(self, code: Any, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class FakeContext:
    def abort(self, code: Any, details: str) -> None:
        raise Aborted(code, details)


def _job_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("meta.json", "{}")
    return buffer.getvalue()


def test_a_job_submitted_onto_a_full_disk_gets_a_clear_error_and_leaves_no_staging_folder(tmp_path, caplog):
    def full_disk(folder: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    staging = tmp_path / "staging"
    staging.mkdir()
    server = SimpleNamespace(
        tls=None, allow_insecure_admin=True, staging_dir=staging, jobs=SimpleNamespace(submit=full_disk)
    )
    archive = _job_archive()
    messages = [pb.UploadMessage(header=pb.UploadHeader(total_size=len(archive))), pb.UploadMessage(data=archive)]
    servicer = AdminServicer(server)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="fl.server"), pytest.raises(Aborted) as refused:
        servicer.SubmitJob(iter(messages), FakeContext())  # type: ignore[arg-type]
    assert refused.value.code.name == "RESOURCE_EXHAUSTED"
    assert refused.value.details == "the server cannot store the job: No space left on device"
    assert "the server cannot store the job" in caplog.text
    assert list(staging.iterdir()) == []
