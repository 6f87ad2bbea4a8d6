"""A script's result streamed on its channel: the bytes are exactly the safetensors file, at any offset,
pulled in any order (a resumed upload pulls again from the server's offset), and no file is written."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fl.channel import LineChannel
from fl.checksum import Checksum
from fl.client.api import ClientAPI
from fl.client.model import FLModel
from fl.tensors import SerializedTensors, write_tensors


def _tensors() -> dict[str, Any]:
    return {
        "b.weight": torch.arange(1000, dtype=torch.float32),
        "a.empty": torch.zeros(0, dtype=torch.float32),
        "c.half": torch.linspace(-2, 2, 77, dtype=torch.float16),
        "d.strided": torch.arange(40, dtype=torch.int64).reshape(5, 8).t(),  # not contiguous: one copy, then views
        "e.numpy": np.arange(33, dtype=np.float64),
    }


def test_serialized_bytes_are_the_file_write_tensors_writes(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "ref.safetensors"
    write_tensors(path, tensors)
    expected = path.read_bytes()
    streamed = SerializedTensors(tensors)
    assert streamed.size == len(expected)
    assert b"".join(bytes(p) for p in streamed.pieces()) == expected
    rng = np.random.default_rng(0)
    for _ in range(200):
        start, end = sorted(int(x) for x in rng.integers(0, len(expected) + 1, 2))
        assert b"".join(bytes(p) for p in streamed.pieces(start, end)) == expected[start:end]
    digest, reference = Checksum(), Checksum()
    streamed.update_digest(digest)
    reference.update(expected)
    assert digest.hexdigest() == reference.hexdigest()


class PullingAgent:
    """Stands in for the site agent: hands out a task that asks for a streamed result, then pulls it."""

    def __init__(self, sock: socket.socket, pulls: list[tuple[int, int]] | None, bad_pull: bool = False) -> None:
        self.channel = LineChannel(sock)
        self.pulls = pulls
        self.bad_pull = bad_pull
        self.result: dict[str, Any] = {}
        self.received: dict[int, bytes] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.channel.recv()  # hello
        self.channel.send({"op": "welcome", "site_name": "site-1", "job_id": "j1"})
        self.channel.recv()  # next_task
        task = {"task_id": "t1", "name": "train", "round": 0, "num_rounds": 1, "model_path": None}
        self.channel.send({"op": "task", "task": {**task, "result_path": "/nonexistent/r", "result_stream": True}})
        self.result = self.channel.recv()
        size = self.result["stream"]["size"]
        if self.bad_pull:
            self.channel.send({"op": "pull", "offset": size - 1, "size": 2})
            return
        for offset, length in self.pulls or [(o, min(1000, size - o)) for o in range(0, size, 1000)]:
            self.channel.send({"op": "pull", "offset": offset, "size": length})
            reply = self.channel.recv()
            assert (reply["op"], reply["offset"], reply["size"]) == ("data", offset, length)
            self.received[offset] = self.channel.recv_bytes(length)
        self.channel.send({"op": "ack", "accepted": True, "message": ""})


def _script(monkeypatch: pytest.MonkeyPatch, pulls: list[tuple[int, int]] | None = None, bad: bool = False):  # type: ignore[no-untyped-def]
    script_end, agent_end = socket.socketpair()
    monkeypatch.setenv("FL_CHANNEL_FD", str(script_end.detach()))
    agent = PullingAgent(agent_end, pulls, bad)
    api = ClientAPI()
    api.init()
    assert api.receive() is not None
    return api, agent


def test_send_streams_the_result_in_the_pieces_the_agent_pulls_and_writes_no_file(monkeypatch, tmp_path) -> None:
    tensors = _tensors()
    path = tmp_path / "ref.safetensors"
    write_tensors(path, tensors)
    expected = path.read_bytes()
    # In order, then again from an earlier offset (an upload resumed from what the server held).
    pulls = [(0, 4000), (4000, len(expected) - 4000), (1234, 3000)]
    api, agent = _script(monkeypatch, pulls)
    assert api.send(FLModel(params=tensors, meta={"NUM_STEPS_CURRENT_ROUND": 1})) is True
    agent.thread.join(10)
    assert agent.result["path"] is None and agent.result["stream"] == {"size": len(expected)}
    assert agent.received[0] + agent.received[4000] == expected
    assert agent.received[1234] == expected[1234:4234]
    reference = Checksum()
    reference.update(expected)
    assert agent.result["checksum"] == reference.hexdigest()


def test_a_pull_outside_the_result_is_refused(monkeypatch) -> None:
    api, agent = _script(monkeypatch, bad=True)
    with pytest.raises(RuntimeError, match="bytes outside the result"):
        api.send(FLModel(params=_tensors(), meta={}))
    agent.thread.join(10)
