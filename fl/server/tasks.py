"""Tasks out to sites and results back: the server's implementation of the Communicator.

``broadcast_and_wait`` queues one task per target site, then waits, with a deadline, until every
target answered, or until the round can no longer reach its minimum (a site failed or its result
was refused; the others are then reported as still working, not as timed out). Results are handed
to the workflow's ``on_result`` in the RPC thread that received them, so aggregation happens as
results arrive. While it waits it logs, every ``status_interval`` seconds, which sites it still
waits for, for how long, and what was last heard from them. A result that arrives after its round
closed is refused with the reason the round ended.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl.filters import FilterChain, FilterContext, replace_file
from fl.log import ContextAdapter
from fl.proto import federation_pb2 as pb
from fl.rounds import log_round, task_label
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
#: How many closed tasks the broker remembers, to tell a late result why its round ended.
ENDED_TASKS_REMEMBERED = 4096
#: Seconds between "still waiting for ..." lines while a round waits (the simulator uses 30).
STATUS_INTERVAL_S = 60.0


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
    #: the job's server-side task_result_filters, run on a result before ``on_result``
    result_filters: FilterChain | None = None
    #: why the server refused this task's last upload (a full disk, a bad update): said if the round times out
    last_refusal: str | None = None


class TaskBroker:
    """Pending tasks of all jobs, by task id; routes results and site failures to their rounds."""

    def __init__(self, registry: SiteRegistry, blobs: BlobStore, uploads: UploadManager) -> None:
        self.registry = registry
        self.blobs = blobs
        self.uploads = uploads
        self._pending: dict[str, PendingTask] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # task id -> why its round ended
        # (site, job id) -> why the job failed there: a task made for it later fails at once, not at its deadline
        self._failed: dict[tuple[str, str], str] = {}
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
            failed = self._failed.get((task.site, task.job_id))
        if failed is not None:  # the site's job failed while the round picked its sites
            self._finish(task, None, failed)

    def site_back(self, site: str, job_id: str) -> None:
        """``site`` runs ``job_id`` again (it restarted): its new tasks are sent, not failed."""
        with self._lock:
            self._failed.pop((site, job_id), None)

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            self._failed = {key: why for key, why in self._failed.items() if key[1] != job_id}

    def close(self, task_ids: Sequence[str], reason: str = "the round had ended") -> None:
        """Close a round's tasks; a result that comes for one later is refused with ``reason``."""
        with self._lock:
            for task_id in task_ids:
                if self._pending.pop(task_id, None) is not None:
                    self._ended[task_id] = reason
            while len(self._ended) > ENDED_TASKS_REMEMBERED:
                self._ended.popitem(last=False)
        for task_id in task_ids:
            self.uploads.discard_task(task_id)

    def _not_pending(self, task_id: str) -> str:
        """Why a result for ``task_id`` cannot be taken (call under the lock)."""
        ended = self._ended.get(task_id)
        if ended is not None:
            return f"task {task_id} is no longer pending: {ended}"
        return f"task {task_id} is not pending (unknown, or its round ended long ago)"

    def expectation(self, *, site: str, job_id: str, task_id: str) -> tuple[Layout | None, int]:
        """What an upload for this task may hold: the model layout to check and a byte limit."""
        with self._lock:
            task = self._pending.get(task_id)
        if task is None or task.job_id != job_id:
            with self._lock:
                raise TransferError("NOT_FOUND", self._not_pending(task_id))
        if task.site != site:
            raise TransferError("PERMISSION_DENIED", f"task {task_id} belongs to site {task.site}, not {site}")
        if task.busy:  # its upload was taken: another one would hold spool the site's limit no longer counts
            raise TransferError("FAILED_PRECONDITION", f"a result for task {task_id} is already being processed")
        layout = task.spec.expected_result_layout
        if layout is None:
            raise TransferError("FAILED_PRECONDITION", f"task {task_id} ({task.spec.name}) takes no params")
        return layout, layout.data_bytes + HEADER_ALLOWANCE

    def note_refusal(self, *, site: str, job_id: str, task_id: str, reason: str) -> None:
        """Remember why an upload for a pending task of ``site`` was refused (a round that times out
        waiting for it says so); a refusal for a task that is not pending, or not the site's, is ignored."""
        with self._lock:
            task = self._pending.get(task_id)
            if task is not None and task.site == site and task.job_id == job_id:
                task.last_refusal = reason

    def spool_limit(self, site: str) -> int:
        """Spool bytes ``site``'s uploads may hold together, from the largest model it has a task for."""
        with self._lock:
            models = [t.spec.expected_result_layout for t in self._pending.values() if t.site == site]
        return site_spool_limit(max((m.data_bytes for m in models if m is not None), default=0))

    def submit(self, site: str, request: pb.SubmitResultRequest) -> tuple[bool, str]:
        """Deliver a site's result to its round; returns ``(accepted, message)``."""
        with self._lock:
            task = self._pending.get(request.task_id)
            if task is None or task.job_id != request.job_id:
                return False, self._not_pending(request.task_id)
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
            if params_path is not None and task.result_filters:
                context = FilterContext(site, task.spec.name, "task_result", params_type, task.spec.model_path, meta)
                replace_file(task.result_filters.apply(params_path, context), params_path)
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
            self._ended[task.task_id] = "its result was already accepted" if result else f"it already ended: {error}"
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
        """Fail every pending task of ``site`` (for ``job_id``, or all its jobs); with ``job_id``, its later
        tasks of that job too, until :meth:`site_back`."""
        with self._lock:
            if job_id is not None:
                self._failed[(site, job_id)] = reason
            doomed = [
                t
                for t in self._pending.values()
                if t.site == site and (job_id is None or t.job_id == job_id) and not t.busy
            ]
        for task in doomed:
            self._finish(task, None, reason)


class JobCommunicator:
    """The Communicator a job's workflow uses; tasks go through the shared broker.

    ``describe_site(site)`` says what was last heard from a site (its heartbeat, its last output),
    for the lines logged every ``status_interval`` seconds while a round waits.
    """

    def __init__(
        self,
        broker: TaskBroker,
        job_id: str,
        abort_event: threading.Event,
        log: ContextAdapter,
        progress: Callable[[int, int], None] | None = None,
        *,
        status_interval: float = STATUS_INTERVAL_S,
        describe_site: Callable[[str], str] | None = None,
    ) -> None:
        if status_interval <= 0:
            raise ValueError(f"status_interval must be positive, got {status_interval}")
        self.broker = broker
        self.job_id = job_id
        self.abort_event = abort_event
        self.log = log
        self.progress = progress
        self.status_interval = status_interval
        self.describe_site = describe_site
        #: the job's server-side task_result_filters (set by the job from config_fed_server.json)
        self.result_filters: FilterChain | None = None

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
        label = task_label(task.name, task.round, task.num_rounds)
        tag = dict(log_round(task.round, task.num_rounds))
        if not targets:
            raise RoundFailed(f"{label}: no sites to send the task to")
        rnd = _Round(targets)
        pending, blob = self._dispatch(task, targets, rnd, on_result, time.time() + timeout)
        self.log.info("%s task sent to %s", task.name, ", ".join(targets), extra=tag)
        ending = "the job was aborted"
        try:
            outcome = self._wait(task, rnd, min_responses, timeout)
            accepted, failed, unanswered = self._outcome(rnd)
            ending = self._ending(label, outcome, accepted, failed, min_responses, timeout)
        finally:
            self.broker.close([p.task_id for p in pending], f"the {label} had already ended: {ending}")
            if blob is not None:
                self.broker.blobs.remove(blob.blob_id)
        if outcome == "aborted":
            raise JobAborted("job aborted")
        for site, reason in failed.items():
            self.log.warning("%s: %s", site, reason, extra=tag)
        if unanswered and outcome == "deadline":
            late = ", ".join(unanswered)
            self.log.warning("no %s result within %.0f s from: %s", task.name, timeout, late, extra=tag)
        elif unanswered:
            still = f"{', '.join(unanswered)} {_were(unanswered)} still working"
            self.log.warning("%s failed while %s: %s", label, still, ending, extra=tag)
        if len(accepted) < min_responses:
            problems = [f"{s}: {r}" for s, r in failed.items()]
            if outcome == "deadline":
                refused = {p.site: p.last_refusal for p in pending if p.last_refusal}
                problems += [
                    f"{s}: no result within {timeout:.0f} s (round_timeout)"
                    + (f"; an upload of its result was refused: {refused[s]}" if s in refused else "")
                    for s in unanswered
                ]
            else:
                problems += [f"{s}: still working when the round failed" for s in unanswered]
            raise RoundFailed(
                f"{label}: {len(accepted)} of {len(targets)} sites answered, {min_responses} needed. "
                + "; ".join(problems)
            )
        return accepted

    def _dispatch(
        self, task: TaskSpec, targets: list[str], rnd: _Round, on_result: OnResult | None, deadline_wall: float
    ) -> tuple[list[PendingTask], Any]:
        """Queue one task per target (and the model they download); returns the tasks and the blob."""
        blob = None
        if task.model_path is not None:
            blob = self.broker.blobs.add(task.model_path, sites=frozenset(targets), checksum=task.model_checksum)
        pending = [
            PendingTask(
                self.job_id, secrets.token_hex(10), site, task, on_result, rnd, result_filters=self.result_filters
            )
            for site in targets
        ]
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
        return pending, blob

    def _wait(self, task: TaskSpec, rnd: _Round, min_responses: int, timeout: float) -> str:
        """Wait for the round's results; returns why the wait ended: complete, unreachable, deadline or aborted."""
        started = time.monotonic()
        deadline = started + timeout
        next_status = started + self.status_interval
        reported = -1
        while not self.abort_event.is_set():
            with rnd.cond:
                done = len(rnd.targets) - rnd.outstanding
                if self.progress is not None and done != reported:
                    reported = done
                    self.progress(done, len(rnd.targets))
                if rnd.outstanding == 0:
                    return "complete"
                if len(rnd.accepted) + rnd.outstanding < min_responses:
                    return "unreachable"
                now = time.monotonic()
                if now >= deadline:
                    return "deadline"
                if now < next_status:
                    rnd.cond.wait(min(deadline - now, next_status - now, 0.5))
                    continue
                answered = {r.site for r in rnd.accepted} | set(rnd.failed)
            # Outside the round's lock: describing a site takes the registry's and the logs' locks.
            next_status = now + self.status_interval
            self._log_waiting(task, rnd.targets, answered, now - started, deadline - now)
        return "aborted"

    def _log_waiting(
        self, task: TaskSpec, targets: list[str], answered: set[str], waited: float, remaining: float
    ) -> None:
        """The line that says, while a round waits, whom it waits for and what they last did."""
        waiting = [s for s in targets if s not in answered]
        describe = self.describe_site
        details = "; ".join(f"{s}: {describe(s)}" for s in waiting) if describe is not None else ""
        self.log.info(
            "%s: waiting %.0f s so far for %s (%d of %d answered; deadline in %.0f s). %s",
            task_label(task.name, task.round, task.num_rounds),
            waited,
            ", ".join(waiting),
            len(targets) - len(waiting),
            len(targets),
            remaining,
            details,
            extra=log_round(task.round, task.num_rounds),
        )

    @staticmethod
    def _outcome(rnd: _Round) -> tuple[list[TaskResult], dict[str, str], list[str]]:
        """(accepted results, failed sites and why, sites that had not answered)."""
        with rnd.cond:
            rnd.open = False
            accepted = list(rnd.accepted)
            failed = dict(rnd.failed)
        answered = {r.site for r in accepted} | set(failed)
        return accepted, failed, [s for s in rnd.targets if s not in answered]

    @staticmethod
    def _ending(
        label: str,
        outcome: str,
        accepted: list[TaskResult],
        failed: dict[str, str],
        min_responses: int,
        timeout: float,
    ) -> str:
        """Why the round ended, in words (for the log and for results that arrive afterwards)."""
        if outcome == "complete":
            return f"every site answered ({len(accepted)} accepted)"
        if outcome == "deadline":
            enough = "enough" if len(accepted) >= min_responses else f"{min_responses} needed"
            return f"its {timeout:.0f} s deadline (round_timeout) passed with {len(accepted)} results ({enough})"
        if outcome == "unreachable":
            reasons = "; ".join(f"{s}: {r}" for s, r in failed.items())
            return f"it could no longer get the {min_responses} results it needs ({reasons})"
        return "the job was aborted"


def _were(sites: Sequence[str]) -> str:
    return "was" if len(sites) == 1 else "were"
