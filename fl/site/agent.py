"""The site agent: connects out to the server, registers, heartbeats, and runs the jobs it is given.

The agent only ever dials out (sites sit behind firewalls). It survives the server going away:
it keeps its jobs' scripts running, reconnects with backoff, and registers again, telling the
server which jobs it still runs, so that a restarted server can resume them.

``fl site`` runs its agent's poll and heartbeat loops on two threads of its own; the simulator's
sites host runs hundreds of agents on one :class:`~fl.site.loops.SharedLoops` and a few shared
channels instead (same steps, same RPCs, no thread per site).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from fl import __version__
from fl.fsutil import atomic_write_json
from fl.log import adapter
from fl.memory import tune_malloc
from fl.metrics import SiteMetrics
from fl.proto import federation_pb2 as pb
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.site.gate import RunGate
from fl.site.job_runner import JobRunner
from fl.site.loops import SharedLoops
from fl.site.shared_downloads import SharedDownloads
from fl.transport import TLSConfig, make_channel
from fl.transport.bulk import BulkStub

__all__ = ["SiteAgent"]

POLL_WAIT_S = 20.0
RPC_TIMEOUT_S = 30.0
#: Seconds an agent on shared loops waits after a failed poll before the next (the threaded loop's pause).
RETRY_AFTER_S = 1.0
#: The longest back-off an agent takes on a busy server's word (PollReply.retry_after_s).
MAX_BUSY_RETRY_S = 60.0
# How long stop() waits for the job runners (their scripts get SIGTERM, then SIGKILL after 10 s).
STOP_WAIT_S = 15.0


def poll_pause(reply: pb.PollReply) -> float:
    """Seconds to wait before the next poll after ``reply``: none after a directive or an ordinary
    empty reply; the server's back-off hint, bounded, when it had no room for the poll to wait."""
    if reply.WhichOneof("directive") is not None or reply.unknown_session:
        return 0.0
    return min(MAX_BUSY_RETRY_S, max(0.0, reply.retry_after_s))


class SiteAgent:
    """A site's daemon logic; ``fl site`` runs one, the simulator runs one per simulated site."""

    def __init__(
        self,
        name: str,
        server: str,
        workspace: Path,
        *,
        tls: TLSConfig | None = None,
        server_name: str | None = None,
        accepts_custom_code: bool = True,
        task_gate: RunGate | None = None,
        exchange_root: Path | None = None,
        metrics_port: int = 0,
        metrics_host: str = "127.0.0.1",
        launcher_config: Path | None = None,
        channel: grpc.Channel | None = None,
        poll_wait: float = POLL_WAIT_S,
        nproc_per_node: int = 1,
        shared_downloads: SharedDownloads | None = None,
    ) -> None:
        """``channel``: one to share with other agents (the simulator's), left open by :meth:`stop`;
        by default the agent makes its own. ``poll_wait``: seconds a long poll may wait for a directive.
        ``shared_downloads``: the simulator's, for its sites of one machine (one download of a model, linked)."""
        self.name = name
        #: Ranks per job's script (> 1: under torch.distributed.run, unless the job's command names its own).
        self.nproc_per_node = nproc_per_node
        self.server = server
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.accepts_custom_code = accepts_custom_code
        self.task_gate = task_gate
        #: Where models pass between this agent and its scripts (default: each job's folder);
        #: a memory-backed folder (/dev/shm) spares the disk two model-sized writes per round.
        self.exchange_root = exchange_root
        #: The simulator's: sites of one machine download a model once and link it (fl.site.shared_downloads).
        self.shared_downloads = shared_downloads
        #: None: job scripts run as local processes; else each runs in a Kubernetes pod (fl.site.kube_launch).
        self.launcher_config = launcher_config
        self.log = adapter("fl.site", site=name)
        self._owns_channel = channel is None
        self.channel = channel or make_channel(server, tls=tls, server_name=server_name)
        self.poll_wait = poll_wait
        self.stub = pb_grpc.FederationStub(self.channel)
        self.bulk = BulkStub(self.channel)
        self.runners: dict[str, JobRunner] = {}
        self.session_id = ""
        self.heartbeat_interval = 5.0
        self.stop_event = threading.Event()
        self.registered = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._last_error = ""
        self._loops: SharedLoops | None = None
        self._register_attempts = 0
        self._poll_call: grpc.Future | None = None  # the long poll in flight on shared loops
        self.metrics = SiteMetrics()
        #: 0: no metrics endpoint; else the port of ``/metrics`` on ``metrics_host``.
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host

    # ------------------------------------------------------------------ plumbing
    def current_session(self) -> str:
        return self.session_id

    def call(self, method: str, request: Any, timeout: float = RPC_TIMEOUT_S) -> Any:
        """A unary RPC with a deadline; on an unknown session, re-register and retry once."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown session" in (exc.details() or ""):
                self.registered.clear()
                if self._register_once():
                    request.session_id = self.session_id
                    return getattr(self.stub, method)(request, timeout=timeout)
            raise

    def running_jobs(self) -> list[str]:
        with self._lock:
            return [j for j, r in self.runners.items() if not r.done.is_set()]

    def _write_status(self) -> None:
        atomic_write_json(
            self.workspace / "site-status.json",
            {
                "site": self.name,
                "registered": self.registered.is_set(),
                "server": self.server,
                "running_jobs": self.running_jobs(),
                "updated": time.time(),
                "last_error": self._last_error,
            },
            fsync=False,
        )

    # ------------------------------------------------------------------ registration
    def _register_once(self) -> bool:
        try:
            reply = self.stub.Register(
                pb.RegisterRequest(
                    site_name=self.name,
                    version=__version__,
                    running_jobs=self.running_jobs(),
                    accepts_custom_code=self.accepts_custom_code,
                ),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            if error != self._last_error:
                level = self.log.error if exc.code() == grpc.StatusCode.PERMISSION_DENIED else self.log.warning
                level("cannot register with %s: %s", self.server, error)
            self._last_error = error
            self._write_status()
            return False
        self.session_id = reply.session_id
        self.heartbeat_interval = reply.heartbeat_interval_s or 5.0
        self.registered.set()
        self._last_error = ""
        self.log.info("registered with %s (server %s)", self.server, reply.server_version)
        self._write_status()
        return True

    @staticmethod
    def _register_backoff(attempt: int) -> float:
        """Seconds before registration attempt ``attempt + 1`` (exponential, capped, with jitter so
        that many sites refused at once do not come back at once)."""
        return min(10.0, 0.2 * 2.0**attempt) * random.uniform(0.75, 1.25)

    def _ensure_registered(self) -> None:
        attempt = 0
        while not self.registered.is_set() and not self.stop_event.is_set():
            if self._register_once():
                return
            attempt += 1
            self.stop_event.wait(self._register_backoff(attempt))

    # ------------------------------------------------------------------ loops
    def start(self, loops: SharedLoops | None = None) -> None:
        """Start polling and heartbeating: on two threads of this agent's, or as steps on ``loops``."""
        tune_malloc()
        if self.metrics_port:
            self.metrics_port = self.metrics.serve(self.metrics_host, self.metrics_port)
            self.log.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)
        if loops is not None:
            self._loops = loops
            loops.after(0.0, self._poll_step)
            # Spread over one interval, so that a thousand agents' heartbeats do not come in bursts.
            loops.after(random.uniform(0.0, self.heartbeat_interval), self._heartbeat_step)
            return
        for target, name in ((self._poll_loop, "fl-poll"), (self._heartbeat_loop, "fl-heartbeat")):
            thread = threading.Thread(target=target, name=f"{name}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def run_forever(self) -> None:
        self.start()
        while not self.stop_event.wait(1.0):
            pass

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every job's script has exited (after its job ended); False at the deadline."""
        return self.wait_jobs_done(time.monotonic() + timeout)

    def wait_jobs_done(self, deadline: float) -> bool:
        """Wait until every job runner here is done, or the (monotonic) deadline; False at the deadline."""
        with self._lock:
            runners = list(self.runners.values())
        return all(r.done.wait(max(0.0, deadline - time.monotonic())) for r in runners)

    def stop(self, reason: str = "site stopping") -> None:
        self.request_stop(reason)
        self.close(time.monotonic() + STOP_WAIT_S)

    def request_stop(self, reason: str) -> None:
        """Stop polling and tell every job runner to stop; returns at once (many agents stop together)."""
        self.stop_event.set()
        if self._poll_call is not None:
            self._poll_call.cancel()
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop(reason)

    def close(self, deadline: float) -> None:
        """After :meth:`request_stop`: wait for the runners until ``deadline``, then release the channel."""
        self.wait_jobs_done(deadline)
        if self._owns_channel:
            self.channel.close()
        self.metrics.close()

    def _poll_loop(self) -> None:
        while not self.stop_event.is_set():
            self._ensure_registered()
            if self.stop_event.is_set():
                return
            try:
                reply = self.stub.Poll(self._poll_request(), timeout=self.poll_wait + RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                if self.stop_event.is_set():
                    return
                self._connection_trouble(exc)
                self.stop_event.wait(RETRY_AFTER_S)
                continue
            self._on_poll_reply(reply)
            pause = poll_pause(reply)
            if pause:
                self.stop_event.wait(pause)

    def _poll_request(self) -> pb.PollRequest:
        return pb.PollRequest(session_id=self.session_id, wait_s=self.poll_wait)

    def _on_poll_reply(self, reply: pb.PollReply) -> None:
        if reply.unknown_session:
            self.registered.clear()
        else:
            self._handle(reply)

    def _poll_step(self) -> None:
        """One step of the poll loop on shared loops: register (with backoff) or start a long poll
        whose completion schedules the next step; no thread waits for it."""
        loops = self._loops
        if loops is None or self.stop_event.is_set():
            return
        if not self.registered.is_set():
            if not self._register_once():
                self._register_attempts += 1
                loops.after(self._register_backoff(self._register_attempts), self._poll_step)
                return
            self._register_attempts = 0
        call = self.stub.Poll.future(self._poll_request(), timeout=self.poll_wait + RPC_TIMEOUT_S)
        self._poll_call = call
        call.add_done_callback(lambda done: loops.after(0.0, lambda: self._polled(done)))

    def _polled(self, call: grpc.Future) -> None:
        """A long poll of :meth:`_poll_step` completed: handle its directive, then poll again."""
        assert self._loops is not None
        if self.stop_event.is_set():
            return
        try:
            reply = call.result()
        except grpc.FutureCancelledError:
            return  # only stop() cancels a poll
        except grpc.RpcError as exc:
            self._connection_trouble(exc)
            self._loops.after(RETRY_AFTER_S, self._poll_step)
            return
        self._on_poll_reply(reply)
        self._loops.after(poll_pause(reply), self._poll_step)

    def _connection_trouble(self, exc: grpc.RpcError) -> None:
        code = exc.code()
        error = f"{code.name}: {exc.details()}"
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE):
            if self.registered.is_set():
                self.log.warning("lost the server (%s); reconnecting", error)
            self.registered.clear()
        elif error != self._last_error:
            self.log.warning("poll failed: %s", error)
        self._last_error = error
        self._write_status()

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.wait(self.heartbeat_interval):
            self._heartbeat_once()

    def _heartbeat_step(self) -> None:
        """One heartbeat on shared loops, then the next one an interval later."""
        if self._loops is None or self.stop_event.is_set():
            return
        self._heartbeat_once()
        self._loops.after(self.heartbeat_interval, self._heartbeat_step)

    def _heartbeat_once(self) -> None:
        if not self.registered.is_set():
            return
        try:
            reply = self.stub.Heartbeat(
                pb.HeartbeatRequest(session_id=self.session_id, running_jobs=self.running_jobs()),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError:
            return  # the poll loop notices and reconnects
        if not reply.known:
            self.registered.clear()
            return
        for job_id in reply.stop_jobs:
            runner = self.runners.get(job_id)
            # A job that ended normally gets its grace period to exit; only stray jobs are stopped.
            if runner is not None and not runner.done.is_set() and runner.ended is None:
                runner.stop("the server no longer runs this job")
        self._write_status()

    # ------------------------------------------------------------------ directives
    def _handle(self, reply: pb.PollReply) -> None:
        kind = reply.WhichOneof("directive")
        if kind == "start_job":
            start = reply.start_job
            with self._lock:
                existing = self.runners.get(start.job_id)
                if existing is not None and not existing.done.is_set():
                    self.log.info("job %s already running here", start.job_id)
                    return
                runner = JobRunner(self, start)
                self.runners[start.job_id] = runner
            self.log.info("starting job %s (%s)", start.job_name, start.job_id)
            runner.start()
        elif kind == "task":
            task_runner = self.runners.get(reply.task.job_id)
            if task_runner is None or task_runner.done.is_set():
                self.log.warning("task for job %s, which does not run here", reply.task.job_id)
                return
            task_runner.add_task(reply.task)
        elif kind == "end_job":
            ended = self.runners.get(reply.end_job.job_id)
            if ended is not None:
                self.log.info(
                    "job %s ended on the server: %s%s",
                    reply.end_job.job_id,
                    reply.end_job.status,
                    f" ({reply.end_job.message})" if reply.end_job.message else "",
                )
                ended.end(reply.end_job.status, reply.end_job.message)


def default_workspace(name: str) -> Path:
    return Path(os.environ.get("FL_WORKSPACE", f"/tmp/fl/{name}"))
