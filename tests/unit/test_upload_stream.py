"""upload_stream: an upload of bytes read from any offset (a script's streamed result) resumes from what
the server holds after a cut, and stops at once, with the reason, when its source is gone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from fl.site.job_runner import _EitherStop
from fl.site.transfers import TransferFailed, upload_stream

DATA = bytes(range(256)) * 4096  # 1 MiB


class Cut(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection cut"


class FakeServer:
    """Takes upload streams; the first is cut after ``cut_after`` bytes."""

    def __init__(self, cut_after: int | None) -> None:
        self.held = bytearray()
        self.cut_after = cut_after
        self.calls = 0

    def future(self, chunks: Iterator[bytes], metadata: Any) -> Any:
        self.calls += 1
        error: list[BaseException] = []
        for data in chunks:
            self.held += data
            if self.cut_after is not None and len(self.held) >= self.cut_after:
                del self.held[self.cut_after :]
                self.cut_after = None
                error.append(Cut())
                break

        def result() -> Any:
            if error:
                raise error[0]
            return SimpleNamespace(complete=len(self.held) == len(DATA), received=len(self.held))

        return SimpleNamespace(result=result, cancel=lambda: None)

    def status(self, request: Any, timeout: float) -> Any:
        return SimpleNamespace(complete=len(self.held) == len(DATA), received=len(self.held))


def _upload(server: FakeServer, read_from: Any, stop: Any = None) -> str:
    return upload_stream(
        SimpleNamespace(Upload=SimpleNamespace(future=server.future)),  # type: ignore[arg-type]
        SimpleNamespace(UploadStatus=server.status),  # type: ignore[arg-type]
        lambda: "session",
        read_from,
        len(DATA),
        "xxh3-128:00",
        job_id="j",
        task_id="t",
        deadline=time.time() + 60,
        stop=stop,
    )


def test_a_cut_stream_resumes_from_the_bytes_the_server_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fl.site.transfers._backoff", lambda attempt: 0.0)
    server = FakeServer(cut_after=300_000)
    starts: list[int] = []

    def read_from(start: int) -> Iterator[bytes]:
        starts.append(start)
        for offset in range(start, len(DATA), 65536):
            yield DATA[offset : offset + 65536]

    assert _upload(server, read_from)
    assert bytes(server.held) == DATA
    assert starts == [0, 300_000] and server.calls == 2


def test_a_source_that_is_gone_stops_the_upload_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fl.site.transfers._backoff", lambda attempt: 0.0)
    server = FakeServer(cut_after=None)
    lost: list[str] = []

    def read_from(start: int) -> Iterator[bytes]:
        yield DATA[:65536]
        lost.append("channel closed")
        raise Cut()  # what gRPC makes of an exception in the request iterator: a retryable status

    def future(chunks: Iterator[bytes], metadata: Any) -> Any:
        server.calls += 1
        try:
            for data in chunks:
                server.held += data
        except Cut as exc:
            caught: BaseException = exc
        return SimpleNamespace(result=lambda: (_ for _ in ()).throw(caught), cancel=lambda: None)

    server.future = future  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(TransferFailed, match="upload stopped"):
        _upload(server, read_from, stop=_EitherStop(threading.Event(), lost))
    assert server.calls == 1 and time.monotonic() - started < 5
