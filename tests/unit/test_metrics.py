"""fl.metrics: gauges computed at scrape time, round timing from job events, failure counting."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from fl.metrics import ServerMetrics, SiteMetrics, counts_failures, heartbeat_families


@dataclass
class FakeSession:
    name: str
    last_seen: float
    connected: bool = True


@dataclass
class FakeRecord:
    status: str


def _value(metrics: ServerMetrics | SiteMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_heartbeat_age_is_seconds_since_each_site_was_last_seen_as_of_the_scrape():
    sessions = [FakeSession("site-1", 100.0), FakeSession("site-2", 90.0, connected=False)]
    connected, age = heartbeat_families(sessions, now=112.5)
    assert [s.value for s in connected.samples] == [1]
    assert {s.labels["site"]: s.value for s in age.samples} == {"site-1": 12.5, "site-2": 22.5}


def test_heartbeat_age_is_never_negative_when_a_clock_steps_back():
    _, age = heartbeat_families([FakeSession("site-1", 200.0)], now=199.0)
    assert age.samples[0].value == 0.0


def test_server_gauges_follow_the_live_objects_at_each_scrape():
    sessions = [FakeSession("site-1", 0.0)]
    records = [FakeRecord("running"), FakeRecord("finished"), FakeRecord("finished")]
    metrics = ServerMetrics(lambda: sessions, lambda: records)
    assert _value(metrics, "fl_sites_connected") == 1
    assert _value(metrics, "fl_jobs", state="finished") == 2
    assert _value(metrics, "fl_jobs", state="aborted") == 0
    sessions.append(FakeSession("site-2", 0.0))
    records[0].status = "finished"
    assert _value(metrics, "fl_sites_connected") == 2
    assert _value(metrics, "fl_jobs", state="finished") == 3 and _value(metrics, "fl_jobs", state="running") == 0
    assert _value(metrics, "fl_site_last_heartbeat_age_seconds", site="site-2") is not None


def test_rounds_are_counted_and_timed_per_job_from_the_engines_events():
    metrics = ServerMetrics(list, list)
    metrics.job_event("a", "round_started", {"round": 0})
    metrics.job_event("b", "round_started", {"round": 0})
    metrics.job_event("a", "round_completed", {"round": 0})
    metrics.job_event("a", "model_evaluated", {})
    assert _value(metrics, "fl_rounds_completed_total") == 1
    assert _value(metrics, "fl_round_duration_seconds_count") == 1
    metrics.job_event("b", "job_finished", {"status": "aborted"})
    metrics.job_event("b", "round_completed", {"round": 0})  # no start known: counted, not timed
    assert _value(metrics, "fl_rounds_completed_total") == 2
    assert _value(metrics, "fl_round_duration_seconds_count") == 1


def test_server_transfers_are_counted_per_site_and_direction():
    metrics = ServerMetrics(list, list)
    metrics.transfers.moved("download", 1000, "site-1")
    metrics.transfers.moved("download", 24, "site-1")
    metrics.transfers.failed("upload", "site-2")
    assert _value(metrics, "fl_transfer_bytes_total", direction="download", site="site-1") == 1024
    assert _value(metrics, "fl_transfer_failures_total", direction="upload", site="site-2") == 1


@counts_failures("download")
def _transfer(fail: bool, *, meter: object = None, stop: threading.Event | None = None) -> str:
    if fail:
        raise RuntimeError("broken")
    return "done"


def test_a_raising_transfer_counts_one_failure_and_a_stopped_one_none():
    metrics = SiteMetrics()
    assert _value(metrics, "fl_transfer_failures_total", direction="download") == 0
    assert _transfer(False, meter=metrics.transfers) == "done"
    with pytest.raises(RuntimeError):
        _transfer(True, meter=metrics.transfers)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(RuntimeError):
        _transfer(True, meter=metrics.transfers, stop=stopped)
    with pytest.raises(RuntimeError):
        _transfer(True)  # no meter: nothing to count, the error still goes on
    assert _value(metrics, "fl_transfer_failures_total", direction="download") == 1


def test_each_object_has_its_own_registry():
    first, second = SiteMetrics(), SiteMetrics()
    first.transfers.moved("upload", 5)
    assert _value(first, "fl_transfer_bytes_total", direction="upload") == 5
    assert _value(second, "fl_transfer_bytes_total", direction="upload") == 0
