"""Tasks out to sites and results back: the server's implementation of the Communicator.

``broadcast_and_wait`` queues one task per target site, then waits, with a deadline, until every
target answered or enough did and the rest cannot (lost, failed). Results are handed to the
workflow's ``on_result`` in the RPC thread that received them, so aggregation happens as results
arrive. Late results (after the round closed) are refused.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl.log import ContextAdapter
from fl.proto import federation_pb2 as pb
from fl.server.sites import SiteRegistry
from fl.server.transfers import (
    HEADER_ALLOWANCE,
    BlobStore,
    TransferError,
    UploadManager,
    remove_quietly,
    site_spool_limit,
)
from fl.tensors import Layout
from fl.workflows.base import JobAborted, OnResult, RoundFailed, TaskResult, TaskSpec

__all__ = ["JobCommunicator", "PendingTask", "TaskBroker", "parse_json_object"]

MAX_JSON_BYTES = 1024 * 1024


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


@dataclass
class _Round:
    """The tasks of one broadcast and what became of them."""

    targets: list[str]
    cond: threading.Condition = field(default_factory=threading.Condition)
    accepted: list[TaskResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # site -> reason
    open: bool = True

    @property
    def outstanding(self) -> int:
        return len(self.targets) - len(self.accepted) - len(self.failed)


@dataclass
class PendingTask:
    job_id: str
    task_id: str
    site: str
    spec: TaskSpec
    on_result: OnResult | None
    round: _Round
    message: pb.Task | None = None  # the directive as sent, for sending again
    busy: bool = False  # a result is being processed


class TaskBroker:
    """Pending tasks of all jobs, by task id; routes results and site failures to their rounds."""

    def __init__(self, registry: SiteRegistry, blobs: BlobStore, uploads: UploadManager) -> None:
        self.registry = registry
        self.blobs = blobs
        self.uploads = uploads
        self._pending: dict[str, PendingTask] = {}
        self._lock = threading.Lock()
        registry.directive_filter = self._wanted
        registry.on_site_lost(lambda site, reason: self.fail_site(site, None, f"site lost ({reason})"))

    def _wanted(self, site: str, directive: pb.PollReply) -> bool:
        # Called under the registry's lock: a plain dict lookup, no lock of ours.
        if directive.WhichOneof("directive") == "task":
            return directive.task.task_id in self._pending
        return True

    def add(self, task: PendingTask) -> None:
        with self._lock:
            self._pending[task.task_id] = task

    def close(self, task_ids: Sequence[str]) -> None:
        with self._lock:
            for task_id in task_ids:
                self._pending.pop(task_id, None)
        for task_id in task_ids:
            self.uploads.discard_task(task_id)

    def expectation(self, *, site: str, job_id: str, task_id: str) -> tuple[Layout | None, int]:
        """What an upload for this task may hold: the model layout to check and a byte limit."""
        with self._lock:
            task = self._pending.get(task_id)
        if task is None or task.job_id != job_id:
            raise TransferError("NOT_FOUND", f"task {task_id} is not pending (the round is over or it is unknown)")
        if task.site != site:
            raise TransferError("PERMISSION_DENIED", f"task {task_id} belongs to site {task.site}, not {site}")
        if task.busy:  # its upload was taken: another one would hold spool the site's limit no longer counts
            raise TransferError("FAILED_PRECONDITION", f"a result for task {task_id} is already being processed")
        layout = task.spec.model_layout
        if layout is None:
            raise TransferError("FAILED_PRECONDITION", f"task {task_id} ({task.spec.name}) takes no params")
        return layout, layout.data_bytes + HEADER_ALLOWANCE

    def spool_limit(self, site: str) -> int:
        """Spool bytes ``site``'s uploads may hold together, from the largest model it has a task for."""
        with self._lock:
            models = [t.spec.model_layout for t in self._pending.values() if t.site == site]
        return site_spool_limit(max((m.data_bytes for m in models if m is not None), default=0))

    def submit(self, site: str, request: pb.SubmitResultRequest) -> tuple[bool, str]:
        """Deliver a site's result to its round; returns ``(accepted, message)``."""
        with self._lock:
            task = self._pending.get(request.task_id)
            if task is None or task.job_id != request.job_id:
                return False, f"task {request.task_id} is not pending (the round is over or it is unknown)"
            if task.site != site:
                return False, f"task {request.task_id} belongs to site {task.site}, not {site}"
            if task.busy:
                return False, f"a result for task {request.task_id} is already being processed"
            task.busy = True
        params_path = None
        try:
            if request.error:
                self._finish(task, None, f"site reported an error: {request.error}")
                return True, "error recorded"
            meta = parse_json_object(request.meta_json, "meta")
            metrics = parse_json_object(request.metrics_json, "metrics")
            params_type = request.params_type or "FULL"
            if params_type not in ("FULL", "DIFF"):
                raise ValueError(f"params_type must be FULL or DIFF, got {params_type!r}")
            if request.upload_id:
                upload = self.uploads.take(request.upload_id, site=site, job_id=task.job_id, task_id=task.task_id)
                params_path = upload.path
            elif task.spec.expect_params:
                raise ValueError(f"a {task.spec.name} result must carry params")
            result = TaskResult(site, task.task_id, meta, metrics, params_type, params_path)
            if task.on_result is not None:
                task.on_result(result)
            result.params_path = None
            self._finish(task, result, None)
            return True, "accepted"
        except (TransferError, ValueError, RuntimeError, OSError) as exc:
            message = f"result refused: {exc}"
            self._finish(task, None, message)
            return False, message
        finally:
            remove_quietly(params_path)

    def _finish(self, task: PendingTask, result: TaskResult | None, error: str | None) -> None:
        with self._lock:
            self._pending.pop(task.task_id, None)
        rnd = task.round
        with rnd.cond:
            if result is not None:
                rnd.accepted.append(result)
            else:
                rnd.failed[task.site] = error or "failed"
            rnd.cond.notify_all()

    def redispatch(self, site: str, job_id: str) -> int:
        """Send ``site`` its pending tasks of ``job_id`` again (it restarted mid-round); returns how many."""
        with self._lock:
            tasks = [t for t in self._pending.values() if t.site == site and t.job_id == job_id and not t.busy]
        for task in tasks:
            if task.message is not None:
                self.registry.enqueue(site, pb.PollReply(task=task.message))
        return len(tasks)

    def fail_site(self, site: str, job_id: str | None, reason: str) -> None:
        """Fail every pending task of ``site`` (for ``job_id``, or all its jobs)."""
        with self._lock:
            doomed = [
                t
                for t in self._pending.values()
                if t.site == site and (job_id is None or t.job_id == job_id) and not t.busy
            ]
        for task in doomed:
            self._finish(task, None, reason)


class JobCommunicator:
    """The Communicator a job's workflow uses; tasks go through the shared broker."""

    def __init__(
        self,
        broker: TaskBroker,
        job_id: str,
        abort_event: threading.Event,
        log: ContextAdapter,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.broker = broker
        self.job_id = job_id
        self.abort_event = abort_event
        self.log = log
        self.progress = progress

    def broadcast_and_wait(
        self,
        task: TaskSpec,
        targets: Sequence[str],
        *,
        min_responses: int,
        timeout: float,
        on_result: OnResult | None = None,
    ) -> list[TaskResult]:
        targets = list(targets)
        if not targets:
            raise RoundFailed(f"{task.name} round {task.round + 1}: no sites to send the task to")
        rnd = _Round(targets)
        deadline_wall = time.time() + timeout
        blob = None
        if task.model_path is not None:
            blob = self.broker.blobs.add(task.model_path, sites=frozenset(targets), checksum=task.model_checksum)
        pending: list[PendingTask] = []
        for site in targets:
            task_id = secrets.token_hex(10)
            pending.append(PendingTask(self.job_id, task_id, site, task, on_result, rnd))
        for p in pending:
            self.broker.add(p)
        for p in pending:
            message = pb.Task(
                job_id=self.job_id,
                task_id=p.task_id,
                name=task.name,
                round=task.round,
                num_rounds=task.num_rounds,
                meta_json=json.dumps(dict(task.meta)),
                params_type=task.params_type,
                deadline=deadline_wall,
            )
            if blob is not None:
                message.model.CopyFrom(pb.BlobRef(blob_id=blob.blob_id, size=blob.size, checksum=blob.checksum))
            p.message = message
            self.broker.registry.enqueue(p.site, pb.PollReply(task=message))
        self.log.info("%s task sent to %s", task.name, ", ".join(targets), extra={"round": task.round + 1})
        deadline = time.monotonic() + timeout
        reported = -1
        try:
            with rnd.cond:
                while not self.abort_event.is_set():
                    done = len(targets) - rnd.outstanding
                    if self.progress is not None and done != reported:
                        reported = done
                        self.progress(done, len(targets))
                    if rnd.outstanding == 0:
                        break
                    if len(rnd.accepted) + rnd.outstanding < min_responses:
                        break  # the minimum can no longer be reached
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    rnd.cond.wait(min(remaining, 0.5))
                rnd.open = False
        finally:
            self.broker.close([p.task_id for p in pending])
            if blob is not None:
                self.broker.blobs.remove(blob.blob_id)
        if self.abort_event.is_set():
            raise JobAborted("job aborted")
        with rnd.cond:
            accepted = list(rnd.accepted)
            answered = {r.site for r in accepted} | set(rnd.failed)
            timed_out = [s for s in targets if s not in answered]
            failed = dict(rnd.failed)
        for site, reason in failed.items():
            self.log.warning("%s: %s", site, reason, extra={"round": task.round + 1})
        if timed_out:
            self.log.warning(
                "no %s result within %.0f s from: %s",
                task.name,
                timeout,
                ", ".join(timed_out),
                extra={"round": task.round + 1},
            )
        if len(accepted) < min_responses:
            problems = [f"{s}: {r}" for s, r in failed.items()]
            problems += [f"{s}: no result within {timeout:.0f} s" for s in timed_out]
            raise RoundFailed(
                f"{task.name} round {task.round + 1}: {len(accepted)} of {len(targets)} sites answered, "
                f"{min_responses} needed. " + "; ".join(problems)
            )
        return accepted
