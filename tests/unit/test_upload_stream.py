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


def test_a_refused_streamed_result_leaves_the_script_channel_to_its_serving_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC reads an upload's request iterator on a thread of its own, which may still be pulling a
    piece when the server has already refused the call (a restarted server: the task is not pending).
    The refusal must not reach the script before that piece is in, and no later read may start: the
    stale reader would take the script's next request (next_task) off the channel, and the site would
    never answer its next task (a CI run: "site-2: no result within 120 s" after a server restart)."""
    import socket

    from fl.channel import LineChannel
    from fl.site.job_runner import JobRunner

    agent_end, script_end = socket.socketpair()
    agent_channel, script_channel = LineChannel(agent_end), LineChannel(script_end)
    readers: list[threading.Thread] = []
    late: list[Iterator[bytes]] = []

    def refused_at_once(*args: Any, **kwargs: Any) -> str:
        read_from = args[3]
        # gRPC's consumer thread starts reading as the call starts; the server's refusal comes first.
        reader = threading.Thread(target=lambda: next(read_from(0), None), daemon=True)
        reader.start()
        readers.append(reader)
        late.append(read_from(0))
        time.sleep(0.05)  # the reader has sent its pull; the script answers it slowly
        raise TransferFailed("upload refused: NOT_FOUND: task t is not pending")

    def slow_script() -> None:
        pull = script_channel.recv()
        time.sleep(0.3)
        script_channel.send_bytes(
            {"op": "data", "offset": pull["offset"], "size": pull["size"]}, [DATA[: pull["size"]]]
        )

    script = threading.Thread(target=slow_script, daemon=True)
    script.start()
    monkeypatch.setattr("fl.site.job_runner.upload_stream", refused_at_once)
    runner = JobRunner.__new__(JobRunner)
    runner.agent = SimpleNamespace(
        bulk=None, stub=None, current_session=lambda: "s", metrics=SimpleNamespace(transfers=None)
    )  # type: ignore[assignment]
    runner.job_id, runner.stop_event = "j", threading.Event()
    message = {"stream": {"size": len(DATA)}, "checksum": "xxh3-128:00"}
    with pytest.raises(TransferFailed, match="not pending"):
        runner._upload_from_script(SimpleNamespace(task_id="t", deadline=0), message, agent_channel)  # type: ignore[arg-type]
    assert not readers[0].is_alive(), "the refusal came back while a reader still pulled from the script"
    assert next(late[0], None) is None  # a call that ended asks again: nothing is read
    script_end.settimeout(0.2)
    with pytest.raises(TimeoutError):
        script_end.recv(1)  # and nothing was asked of the script
    script.join(5)
