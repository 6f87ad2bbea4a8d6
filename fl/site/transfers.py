"""Site-side bulk transfers: downloads and uploads in chunks, with per-chunk deadlines and resume.

A transfer that stalls (no chunk for ``chunk_timeout`` seconds) or breaks (connection lost, server
restarted) is resumed from the bytes already moved, until the overall deadline. Every download is
checked against the sha256 the server announced; every upload carries the site's sha256.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from fl.proto import federation_pb2 as pb
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.transport import CHUNK_BYTES

__all__ = ["TransferFailed", "download_blob", "upload_file"]

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,  # session expired (server restarted): the agent re-registers
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class TransferFailed(RuntimeError):
    """A transfer that could not complete; the message says what happened."""


class _StallGuard:
    """Cancels a gRPC call when no progress is reported for ``timeout`` seconds."""

    def __init__(self, call: Any, timeout: float) -> None:
        self.call = call
        self.timeout = timeout
        self.last = time.monotonic()
        self.stalled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="fl-stall-guard")

    def __enter__(self) -> _StallGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def kick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.stalled = True
                self.call.cancel()
                return


def _backoff(attempt: int) -> float:
    return float(min(10.0, 0.2 * 2.0**attempt))


def download_blob(
    stub: pb_grpc.FederationStub,
    session_id: Callable[[], str],
    ref: pb.BlobRef,
    dest: Path,
    *,
    deadline: float,
    chunk_timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> None:
    """Download ``ref`` to ``dest`` (atomically), resuming after failures until ``deadline`` (unix time)."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"")
    digest = hashlib.sha256()
    received = 0
    attempt = 0
    last_error = ""
    with open(part, "r+b") as out:
        while received < ref.size or ref.size == 0:
            if stop is not None and stop.is_set():
                raise TransferFailed("download stopped")
            if time.time() > deadline:
                raise TransferFailed(
                    f"download of {ref.size} bytes incomplete at its deadline ({received} bytes): {last_error}"
                )
            call = stub.Download(pb.DownloadRequest(session_id=session_id(), blob_id=ref.blob_id, offset=received))
            try:
                with _StallGuard(call, chunk_timeout) as guard:
                    for chunk in call:
                        guard.kick()
                        out.write(chunk.data)
                        digest.update(chunk.data)
                        received += len(chunk.data)
                        if received > ref.size:
                            raise TransferFailed(f"download larger than announced ({ref.size} bytes)")
                if ref.size == 0 or received == ref.size:
                    break
                last_error = "stream ended early"
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRYABLE:
                    raise TransferFailed(f"download refused: {code.name}: {exc.details()}") from None
                last_error = "stalled" if code == grpc.StatusCode.CANCELLED else f"{code.name}: {exc.details()}"
            attempt += 1
            time.sleep(_backoff(attempt))
    if digest.hexdigest() != ref.sha256:
        part.unlink(missing_ok=True)
        raise TransferFailed("downloaded data does not match its sha256")
    os.replace(part, dest)


def upload_file(
    stub: pb_grpc.FederationStub,
    session_id: Callable[[], str],
    path: Path,
    *,
    job_id: str,
    task_id: str,
    deadline: float,
    sha256: str | None = None,
    chunk_timeout: float = 60.0,
    stop: threading.Event | None = None,
) -> str:
    """Upload a file for a task, resuming after failures until ``deadline``; returns the upload id.

    ``sha256`` is the file's digest if the writer computed it (else it is computed here); the server
    checks the bytes it assembled against it.
    """
    if sha256 is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while data := f.read(CHUNK_BYTES):
                digest.update(data)
        sha256 = digest.hexdigest()
    upload_id = secrets.token_hex(12)
    total = path.stat().st_size
    offset = 0
    attempt = 0
    last_error = ""
    while True:
        if stop is not None and stop.is_set():
            raise TransferFailed("upload stopped")
        if time.time() > deadline:
            raise TransferFailed(f"upload incomplete at its deadline ({offset} of {total} bytes): {last_error}")
        sid = session_id()
        if attempt:
            try:
                status = stub.UploadStatus(pb.UploadStatusRequest(session_id=sid, upload_id=upload_id), timeout=30)
                offset = status.received
                if status.complete:
                    return upload_id
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise TransferFailed(f"upload refused: {exc.code().name}: {exc.details()}") from None
                last_error = f"{exc.code().name}: {exc.details()}"
                attempt += 1
                time.sleep(_backoff(attempt))
                continue
        guard_box: list[_StallGuard] = []
        header = pb.UploadHeader(
            session_id=sid,
            upload_id=upload_id,
            job_id=job_id,
            task_id=task_id,
            offset=offset,
            total_size=total,
            sha256=sha256,
        )

        def messages(
            header: pb.UploadHeader = header, guard_box: list[_StallGuard] = guard_box
        ) -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=header)
            with open(path, "rb") as f:
                f.seek(header.offset)
                while data := f.read(CHUNK_BYTES):
                    if guard_box:
                        guard_box[0].kick()
                    yield pb.UploadMessage(data=data)

        future = stub.Upload.future(messages())
        try:
            with _StallGuard(future, chunk_timeout) as guard:
                guard_box.append(guard)
                reply = future.result()
            if reply.complete:
                return upload_id
            last_error = f"server holds {reply.received} of {total} bytes"
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in RETRYABLE:
                raise TransferFailed(f"upload refused: {code.name}: {exc.details()}") from None
            last_error = "stalled" if code == grpc.StatusCode.CANCELLED else f"{code.name}: {exc.details()}"
        attempt += 1
        time.sleep(_backoff(attempt))
