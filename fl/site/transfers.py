"""Site-side bulk transfers: downloads and uploads in chunks, with per-chunk deadlines and resume.

A transfer that stalls (no chunk for ``chunk_timeout`` seconds) or breaks (connection lost, server
restarted) is resumed from the bytes already moved, until the overall deadline. Every download is
checked against the checksum the server announced; every upload carries the site's checksum.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc

from fl.checksum import Checksum
from fl.metrics import TransferMeter, counts_failures
from fl.proto import federation_pb2 as pb
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.transport.bulk import BULK_UPLOAD_CHUNK_BYTES, BulkStub, UploadMeta

__all__ = ["Stop", "TransferFailed", "download_blob", "file_reader", "upload_stream"]

log = logging.getLogger("fl.site.transfers")

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,  # session expired (server restarted): the agent re-registers
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Stop(Protocol):
    """What a transfer checks between attempts (a threading.Event, or anything with its ``is_set``)."""

    def is_set(self) -> bool: ...


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


def _describe(exc: grpc.RpcError, guard: _StallGuard | None) -> str:
    if guard is not None and guard.stalled:
        return f"no data for {guard.timeout:.0f} s"
    return f"{exc.code().name}: {exc.details()}"


@counts_failures("download")
def download_blob(
    stub: BulkStub,
    session_id: Callable[[], str],
    ref: pb.BlobRef,
    dest: Path,
    *,
    deadline: float,
    chunk_timeout: float = 60.0,
    stop: Stop | None = None,
    meter: TransferMeter | None = None,
) -> None:
    """Download ``ref`` to ``dest`` (atomically), resuming after failures until ``deadline`` (unix time)."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    checksum = Checksum()
    received = 0
    attempt = 0
    last_error = ""
    with open(part, "wb") as out:
        while True:
            if stop is not None and stop.is_set():
                raise TransferFailed("download stopped")
            if time.time() > deadline:
                raise TransferFailed(
                    f"download incomplete at its deadline ({received} of {ref.size} bytes): {last_error}"
                )
            call = stub.Download(pb.DownloadRequest(session_id=session_id(), blob_id=ref.blob_id, offset=received))
            guard = _StallGuard(call, chunk_timeout)
            try:
                with guard:
                    for data in call:
                        guard.kick()
                        out.write(data)
                        checksum.update(data)
                        received += len(data)
                        if meter is not None:
                            meter.moved("download", len(data))
                        if received > ref.size:
                            raise TransferFailed(f"download larger than announced ({ref.size} bytes)")
                if received == ref.size:
                    break
                last_error = f"stream ended after {received} of {ref.size} bytes"
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise TransferFailed(f"download refused: {exc.code().name}: {exc.details()}") from None
                last_error = _describe(exc, guard)
            log.warning("download interrupted (%s); resuming from byte %d of %d", last_error, received, ref.size)
            attempt += 1
            time.sleep(_backoff(attempt))
    if checksum.hexdigest() != ref.checksum:
        part.unlink(missing_ok=True)
        raise TransferFailed(f"downloaded data does not match its checksum ({checksum.hexdigest()} != {ref.checksum})")
    os.replace(part, dest)


def file_reader(path: Path) -> Callable[[int], Iterator[bytes]]:
    """What :func:`upload_stream` reads a file's bytes with: chunks from any offset."""

    def read_from(start: int) -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(start)
            while data := f.read(BULK_UPLOAD_CHUNK_BYTES):
                yield data

    return read_from


@counts_failures("upload")
def upload_stream(
    stub: BulkStub,
    control: pb_grpc.FederationStub,
    session_id: Callable[[], str],
    read_from: Callable[[int], Iterator[bytes]],
    total: int,
    checksum: str,
    *,
    job_id: str,
    task_id: str,
    deadline: float,
    chunk_timeout: float = 60.0,
    stop: Stop | None = None,
    meter: TransferMeter | None = None,
) -> str:
    """Upload ``total`` bytes that ``read_from(offset)`` yields from any offset (a file's, see
    :func:`file_reader`, or a training script's result pulled over its channel), resuming after
    failures until ``deadline``; returns the upload id. ``checksum`` is of all the bytes: the server
    checks what it assembled against it.
    """
    upload_id = secrets.token_hex(12)
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
                status = control.UploadStatus(pb.UploadStatusRequest(session_id=sid, upload_id=upload_id), timeout=30)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise TransferFailed(f"upload refused: {exc.code().name}: {exc.details()}") from None
                last_error = f"{exc.code().name}: {exc.details()}"
                attempt += 1
                time.sleep(_backoff(attempt))
                continue
            if status.complete:
                return upload_id
            offset = status.received
            log.warning("upload interrupted (%s); resumed from byte %d of %d", last_error, offset, total)
        meta = UploadMeta(sid, upload_id, job_id, task_id, offset, total, checksum)
        guard_box: list[_StallGuard] = []

        def chunks(start: int = offset, guard_box: list[_StallGuard] = guard_box) -> Iterator[bytes]:
            for data in read_from(start):
                if guard_box:
                    guard_box[0].kick()
                if meter is not None:
                    meter.moved("upload", len(data))
                yield data

        future = stub.Upload.future(chunks(), metadata=meta.to_metadata())
        guard = _StallGuard(future, chunk_timeout)
        try:
            with guard:
                guard_box.append(guard)
                reply = future.result()
            if reply.complete:
                return upload_id
            last_error = f"server holds {reply.received} of {total} bytes"
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise TransferFailed(f"upload refused: {exc.code().name}: {exc.details()}") from None
            last_error = _describe(exc, guard)
        attempt += 1
        time.sleep(_backoff(attempt))
