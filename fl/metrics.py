"""Prometheus metrics for operators: one registry per server or site object, served on ``--metrics-port``.

Every family is defined here once (names ``fl_...``, units in the names). Counters move where the
event happens (a transfer chunk, a finished round); gauges that describe state (sites connected,
heartbeat age, jobs by state) are computed at scrape time from the live objects, so they never drift.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "JOB_STATES",
    "METRICS_PORT_ENV",
    "MetricsEndpoint",
    "ServerMetrics",
    "SiteMetrics",
    "TransferMeter",
    "counts_failures",
]

METRICS_PORT_ENV = "FL_METRICS_PORT"
JOB_STATES = ("submitted", "waiting", "running", "finished", "failed", "aborted")
ROUND_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
DIRECTIONS = ("upload", "download")
P = ParamSpec("P")
R = TypeVar("R")


class _Session(Protocol):
    name: str
    last_seen: float
    connected: bool


class _Record(Protocol):
    status: str


class MetricsEndpoint:
    """A registry of its own and the HTTP server that exposes it (``/metrics``) while started."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def serve(self, host: str, port: int) -> int:
        """Serve the registry on ``host:port`` (0 picks a free port); returns the bound port."""
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class TransferMeter:
    """Bytes moved and failed transfers, by direction (and by site on the server)."""

    def __init__(self, registry: CollectorRegistry, *, per_site: bool) -> None:
        labels = ["direction", "site"] if per_site else ["direction"]
        self.bytes = Counter(
            "fl_transfer_bytes",
            "Model and app bytes moved (chunks sent or received)",
            labels,
            registry=registry,
            unit="bytes",
        )
        self.failures = Counter("fl_transfer_failures", "Uploads and downloads that failed", labels, registry=registry)
        if not per_site:
            for direction in DIRECTIONS:  # the series exist (at 0) before the first transfer
                self.bytes.labels(direction)
                self.failures.labels(direction)

    def moved(self, direction: str, nbytes: int, site: str | None = None) -> None:
        self.bytes.labels(direction, *([site] if site else [])).inc(nbytes)

    def failed(self, direction: str, site: str | None = None) -> None:
        self.failures.labels(direction, *([site] if site else [])).inc()

    @contextmanager
    def counting_failure(self, direction: str, site: str | None = None) -> Iterator[None]:
        """Count one failure of ``direction`` if the block raises (the exception goes on)."""
        try:
            yield
        except BaseException:
            self.failed(direction, site)
            raise


def counts_failures(direction: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a transfer function taking ``meter=`` and ``stop=`` keywords: a raise counts as one
    failed ``direction`` transfer on the meter, unless ``stop`` was set (stopping is not failing)."""

    def wrap(transfer: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(transfer)
        def counted(*args: P.args, **kwargs: P.kwargs) -> R:
            meter, stop = kwargs.get("meter"), kwargs.get("stop")
            try:
                return transfer(*args, **kwargs)
            except BaseException:
                is_set = getattr(stop, "is_set", None)  # a threading.Event, or anything that reads like one
                stopped = callable(is_set) and bool(is_set())
                if isinstance(meter, TransferMeter) and not stopped:
                    meter.failed(direction)
                raise

        return counted

    return wrap


def heartbeat_families(sessions: Iterable[_Session], now: float) -> list[Metric]:
    """Sites connected and each site's seconds since it was last heard from, as of ``now``."""
    connected = GaugeMetricFamily("fl_sites_connected", "Sites with a live session")
    age = GaugeMetricFamily(
        "fl_site_last_heartbeat_age_seconds", "Seconds since each registered site was last heard from", labels=["site"]
    )
    count = 0
    for session in sessions:
        count += bool(session.connected)
        age.add_metric([session.name], max(0.0, now - session.last_seen))
    connected.add_metric([], count)
    return [connected, age]


def job_state_family(records: Iterable[_Record]) -> Metric:
    """Jobs the server knows, by state (every state listed, 0 where none)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    family = GaugeMetricFamily("fl_jobs", "Jobs the server knows, by state", labels=["state"])
    for state, n in counts.items():
        family.add_metric([state], n)
    return family


class _StateCollector(Collector):
    """Gauges computed at scrape time from the server's site registry and job records."""

    def __init__(self, sessions: Callable[[], Iterable[_Session]], records: Callable[[], Iterable[_Record]]) -> None:
        self._sessions = sessions
        self._records = records

    def collect(self) -> Iterable[Metric]:
        yield from heartbeat_families(self._sessions(), time.time())
        yield job_state_family(self._records())

    def describe(self) -> Iterable[Metric]:
        return []  # no samples at registration: the live objects may not be ready yet


class ServerMetrics(MetricsEndpoint):
    """The server's families: sites, jobs, rounds, transfers."""

    def __init__(self, sessions: Callable[[], Iterable[_Session]], records: Callable[[], Iterable[_Record]]) -> None:
        super().__init__()
        self.transfers = TransferMeter(self.registry, per_site=True)
        self.rounds = Counter("fl_rounds_completed", "Rounds the server completed (all jobs)", registry=self.registry)
        self.round_duration = Histogram(
            "fl_round_duration_seconds",
            "Wall time from a round's start to its completion",
            buckets=ROUND_BUCKETS_S,
            registry=self.registry,
        )
        self._round_started: dict[str, float] = {}
        self._lock = threading.Lock()
        self.registry.register(_StateCollector(sessions, records))

    def job_event(self, job_id: str, event: str, data: Mapping[str, Any]) -> None:
        """A job's event (the round engine's round_started/round_completed): count rounds, time them."""
        now = time.monotonic()
        with self._lock:
            if event == "round_started":
                self._round_started[job_id] = now
                return
            if event == "job_finished":
                self._round_started.pop(job_id, None)
                return
            if event != "round_completed":
                return
            started = self._round_started.pop(job_id, None)
        self.rounds.inc()
        if started is not None:
            self.round_duration.observe(now - started)


class SiteMetrics(MetricsEndpoint):
    """A site's families: its transfers."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers = TransferMeter(self.registry, per_site=False)
