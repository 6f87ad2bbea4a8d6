"""The tracking receivers' common part: batches reach deliver() in order, a full queue drops and
counts instead of blocking, and a failing tracking service never raises into the server's events."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from fl.components import tracking
from fl.components.base import Events
from fl.components.mlflow_receiver import MLflowReceiver
from fl.components.tracking import TrackingReceiver
from fl.components.wandb_receiver import WandBReceiver


class Recorder(TrackingReceiver):
    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        super().__init__()
        self.gate, self.fail = gate, fail
        self.delivered: list[tuple[str, list[dict[str, Any]]]] = []
        self.finished: str | None = None

    def start(self, ctx: Any) -> None:
        if self.gate is not None:
            self.gate.wait(30)

    def deliver(self, ctx: Any, site: str, records: list[dict[str, Any]]) -> None:
        if self.fail:
            raise ConnectionError("tracking server down")
        self.delivered.append((site, records))

    def finish(self, ctx: Any, status: str) -> None:
        self.finished = status


CTX = SimpleNamespace(log=logging.getLogger("test"), run_dir=".", job_id="j")
RECORD = {"tag": "loss", "value": 1.0, "step": 0, "kind": ""}


def test_batches_and_the_servers_metrics_are_delivered_in_order_then_the_runs_end():
    r = Recorder()
    r.handle_event(Events.ANALYTICS, {"site": "site-1", "records": [RECORD]}, CTX)
    r.handle_event(Events.MODEL_EVALUATED, {"metrics": {"acc": 0.5}, "model_version": 1}, CTX)
    r.handle_event(Events.JOB_FINISHED, {"status": "finished"}, CTX)
    assert r.delivered[0] == ("site-1", [RECORD])
    assert r.delivered[1][0] == "server" and r.delivered[1][1][0]["tag"] == "global/acc"
    assert r.finished == "finished"


def test_a_full_queue_drops_and_counts_rather_than_blocking_the_server(monkeypatch, caplog):
    monkeypatch.setattr(tracking, "MAX_PENDING_BATCHES", 2)
    gate = threading.Event()
    r = Recorder(gate)
    for _ in range(5):  # the worker is held in start(): nothing is taken off the queue
        r.handle_event(Events.ANALYTICS, {"site": "site-1", "records": [RECORD]}, CTX)
    assert r._dropped == 3
    gate.set()
    with caplog.at_level(logging.WARNING):
        r.handle_event(Events.JOB_FINISHED, {"status": "finished"}, CTX)
    assert len(r.delivered) == 2
    assert "3 batches of metrics dropped" in caplog.text


def test_a_failing_tracking_service_is_logged_not_raised(caplog):
    r = Recorder(fail=True)
    with caplog.at_level(logging.WARNING):
        r.handle_event(Events.ANALYTICS, {"site": "site-1", "records": [RECORD]}, CTX)
        r.handle_event(Events.JOB_FINISHED, {"status": "failed"}, CTX)
    assert "metrics of site-1 not delivered: ConnectionError" in caplog.text
    assert r.finished == "failed"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLflowReceiver(tracking_uri=5), "tracking_uri must be a string"),  # type: ignore[arg-type]
        (lambda: MLflowReceiver(kw_args={"experiment_name": " "}), "must not be empty"),
        (lambda: MLflowReceiver(kw_args={"run_tags": "x"}), "run_tags"),
        (lambda: WandBReceiver(wandb_args={"project": "p"}), "needs group, job_type"),
        (lambda: WandBReceiver(wandb_args={"project": "p", "group": "g", "job_type": "t"}, mode="cloud"), "mode"),
    ],
)
def test_receiver_arguments_are_checked_when_the_job_is_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_tensorboard_receiver_writes_no_scalar_for_params_and_tags(tmp_path):
    from fl.components.tb_receiver import TBAnalyticsReceiver

    tb = TBAnalyticsReceiver()
    param = {"tag": "lr", "value": 0.0, "step": None, "kind": "param", "text": "0.1", "group_member": ""}
    tb.handle_event(Events.ANALYTICS, {"site": "site-1", "records": [param]}, SimpleNamespace(run_dir=tmp_path))
    assert not (tmp_path / "tb_events" / "site-1").exists()
