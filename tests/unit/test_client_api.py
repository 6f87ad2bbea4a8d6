"""The Client API against a scripted stand-in for the site agent (a socket pair): receive's timeout,
FLARE's cached model, and the records that log() sends for each FLARE data type."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.channel import LineChannel
from fl.client.api import ClientAPI, analytics_records
from fl.client.model import FLModel, ParamsType
from fl.tensors import load_numpy, write_tensors

TASK = {"task_id": "t1", "name": "train", "round": 0, "num_rounds": 2, "model_path": None, "result_path": "/dev/null"}


class FakeAgent:
    """Answers the script's requests with scripted replies; remembers what it was asked."""

    def __init__(self, sock: socket.socket, replies: list[dict[str, Any]], welcome: dict[str, Any]) -> None:
        self.channel = LineChannel(sock)
        self.replies = replies
        self.welcome = welcome
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.requests.append(self.channel.recv())
        self.channel.send({"op": "welcome", "site_name": "site-1", "job_id": "j1", **self.welcome})
        for reply in self.replies:
            self.requests.append(self.channel.recv())
            self.channel.send(reply)


@pytest.fixture
def connect(monkeypatch) -> Iterator[Any]:
    pairs: list[socket.socket] = []

    def make(replies: list[dict[str, Any]], **welcome: Any) -> tuple[ClientAPI, FakeAgent]:
        script_end, agent_end = socket.socketpair()
        pairs.extend([script_end, agent_end])
        monkeypatch.setenv("FL_CHANNEL_FD", str(script_end.detach()))
        agent = FakeAgent(agent_end, replies, welcome)
        api = ClientAPI()
        api.init()
        return api, agent

    yield make
    for s in pairs:
        s.close()


def test_receive_with_timeout_returns_none_and_passes_the_timeout_to_the_agent(connect):
    api, agent = connect([{"op": "timeout"}])
    assert api.receive(timeout=0) is None
    agent.thread.join(5)
    assert agent.requests[-1] == {"op": "next_task", "timeout": 0}


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), "5", True])
def test_receive_refuses_a_timeout_that_is_not_seconds(bad):
    with pytest.raises(ValueError, match="timeout must be None or seconds >= 0"):
        ClientAPI().receive(timeout=bad)


def test_current_model_is_the_received_model_until_the_task_is_answered(connect):
    api, agent = connect([{"op": "task", "task": TASK}])
    model = api.receive()
    assert model is not None and model.current_round == 0
    assert api.current_model() is model  # no second request: FLARE's receive caches the task's model
    agent.thread.join(5)
    assert [r["op"] for r in agent.requests] == ["hello", "next_task"]


def _diff_task(tmp_path: Path) -> dict[str, Any]:
    write_tensors(tmp_path / "global.safetensors", {"w": np.array([1.0, 2.0], dtype=np.float32)})
    return {**TASK, "model_path": str(tmp_path / "global.safetensors"), "result_path": str(tmp_path / "r.safetensors")}


def test_diff_transfer_sends_a_full_result_as_its_difference_to_the_received_model(connect, tmp_path):
    task = _diff_task(tmp_path)
    api, agent = connect([{"op": "task", "task": task}, {"op": "ack", "accepted": True}],
                         params_format="numpy", transfer_type="DIFF")  # fmt: skip
    received = api.receive()
    assert received is not None
    assert api.send(FLModel(params={"w": received.params["w"] + 3}))
    agent.thread.join(5)
    assert agent.requests[-1]["params_type"] == "DIFF"
    np.testing.assert_array_equal(load_numpy(task["result_path"])["w"], np.array([3.0, 3.0], dtype=np.float32))


def test_diff_transfer_keeps_a_result_the_script_already_sent_as_a_difference(connect, tmp_path):
    task = _diff_task(tmp_path)
    api, agent = connect([{"op": "task", "task": task}, {"op": "ack", "accepted": True}],
                         params_format="numpy", transfer_type="DIFF")  # fmt: skip
    api.receive()
    assert api.send(FLModel(params={"w": np.array([1.0, 1.0], dtype=np.float32)}, params_type=ParamsType.DIFF))
    agent.thread.join(5)
    assert agent.requests[-1]["params_type"] == "DIFF"
    np.testing.assert_array_equal(load_numpy(task["result_path"])["w"], np.array([1.0, 1.0], dtype=np.float32))


@pytest.mark.timeout(60)  # without the check, send() would wait for an ack that never comes
def test_diff_transfer_refuses_a_result_naming_params_the_task_did_not_bring(connect, tmp_path):
    api, _ = connect([{"op": "task", "task": _diff_task(tmp_path)}], params_format="numpy", transfer_type="DIFF")
    api.receive()
    with pytest.raises(ValueError, match=r"DIFF but \['extra'\] were not in the received model"):
        api.send(FLModel(params={"w": np.zeros(2, dtype=np.float32), "extra": np.zeros(1, dtype=np.float32)}))


def test_log_records_for_each_flare_data_type():
    [metric] = analytics_records("loss", 1.5, "METRIC", 3)
    assert (metric["tag"], metric["value"], metric["step"], metric["group_member"]) == ("loss", 1.5, 3, "")
    metrics = analytics_records("metrics", {"a": 1, "b": 2.0}, "METRICS", 1)
    assert [(r["tag"], r["value"]) for r in metrics] == [("a", 1.0), ("b", 2.0)]
    group = analytics_records("lr", {"x": 1}, "SCALARS", 0)
    assert [(r["tag"], r["group_member"]) for r in group] == [("lr", "x")]
    params = analytics_records("params", {"lr": 0.1, "opt": "sgd"}, "PARAMETERS", None)
    assert [(r["tag"], r["kind"], r["text"]) for r in params] == [("lr", "param", "0.1"), ("opt", "param", "sgd")]
    [tag] = analytics_records("team", "fl", "TAG", None)
    assert (tag["kind"], tag["text"]) == ("tag", "fl")


def test_log_refuses_an_unknown_data_type():
    with pytest.raises(ValueError, match="IMAGE"):
        analytics_records("img", 1, "IMAGE", 0)
