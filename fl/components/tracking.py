"""The common part of the receivers that forward sites' metrics to a tracking service (MLflow, W&B).

Deliveries happen on a worker thread behind a bounded queue, so a slow or unreachable tracking
service never holds up the server's handling of reports or the rounds; when the queue is full,
batches are dropped and counted, and the job's log says so. At the end of the job the queue is
drained for at most ``DRAIN_TIMEOUT_S``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from fl.components.base import Component, Events

__all__ = ["DRAIN_TIMEOUT_S", "MAX_PENDING_BATCHES", "MAX_RECORD_TEXT", "RECORD_KINDS", "TrackingReceiver"]

#: Characters of a param or tag value kept (MLflow's own limit for a param value is 6000); the site
#: cuts what its script logs, the server cuts what any site claims.
MAX_RECORD_TEXT = 6000
#: Kinds of analytics records besides metrics (kind ""): the MLflow-style writers' params and tags.
RECORD_KINDS = ("param", "tag")

#: Batches (one site's report, or one evaluated model) waiting for the tracking service at most.
MAX_PENDING_BATCHES = 1000
#: Seconds the end of a job waits for the batches still queued.
DRAIN_TIMEOUT_S = 30.0
#: The pseudo-site of the server's own aggregated metrics (``global/<metric>``, step = model version).
SERVER_RUN = "server"

_STOP = object()


class TrackingReceiver(Component):
    """Queues each site's records and the server's evaluated metrics; a worker thread delivers them."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.events = list(events or ["fed.analytix_log_stats"])
        self._queue: queue.Queue[Any] = queue.Queue(MAX_PENDING_BATCHES)
        self._worker: threading.Thread | None = None
        self._dropped = 0
        self._failed = False

    # ------------------------------------------------------------------ to implement
    def start(self, ctx: Any) -> None:
        """Connect to the tracking service (on the worker thread)."""
        raise NotImplementedError

    def deliver(self, ctx: Any, site: str, records: list[dict[str, Any]]) -> None:
        """Send one site's records (``tag, value, step, wall_time, group_member, kind, text``)."""
        raise NotImplementedError

    def finish(self, ctx: Any, status: str) -> None:
        """End the runs (on the worker thread, after the last delivery)."""

    # ------------------------------------------------------------------ events
    def handle_event(self, event: str, data: dict[str, Any], ctx: Any) -> None:
        if event == Events.ANALYTICS:
            self._put(ctx, (str(data["site"]), list(data["records"])))
        elif event == Events.MODEL_EVALUATED:
            records = [
                {"tag": f"global/{key}", "value": value, "step": data["model_version"], "kind": ""}
                for key, value in data["metrics"].items()
            ]
            self._put(ctx, (SERVER_RUN, records))
        elif event == Events.JOB_FINISHED and self._worker is not None:
            self._queue.put((_STOP, str(data.get("status", ""))))
            self._worker.join(DRAIN_TIMEOUT_S)
            if self._worker.is_alive():
                ctx.log.warning("%s: the tracking service took over %.0f s; metrics still queued are lost",
                                type(self).__name__, DRAIN_TIMEOUT_S)  # fmt: skip
            if self._dropped:
                ctx.log.warning("%s: %d batches of metrics dropped (more than %d were waiting)",
                                type(self).__name__, self._dropped, MAX_PENDING_BATCHES)  # fmt: skip

    def _put(self, ctx: Any, item: tuple[str, list[dict[str, Any]]]) -> None:
        if self._failed:
            return
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, args=(ctx,), name=type(self).__name__, daemon=True)
            self._worker.start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += 1

    def _work(self, ctx: Any) -> None:
        name = type(self).__name__
        try:
            self.start(ctx)
        except Exception as exc:
            self._failed = True
            ctx.log.error("%s: cannot start tracking (%s: %s); no metrics are sent", name, type(exc).__name__, exc)
            return
        while True:
            site, payload = self._queue.get()
            if site is _STOP:
                status = str(payload)
                break
            try:
                self.deliver(ctx, site, payload)
            except Exception as exc:
                ctx.log.warning("%s: metrics of %s not delivered: %s: %s", name, site, type(exc).__name__, exc)
        try:
            self.finish(ctx, status)
        except Exception as exc:
            ctx.log.warning("%s: could not end the runs: %s: %s", name, type(exc).__name__, exc)
