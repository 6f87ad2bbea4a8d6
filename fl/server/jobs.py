"""Jobs on the server: the queue, one thread per running job, status on disk, resume after restart.

Every job lives in ``WORKSPACE/jobs/<job-id>/``: ``job/`` (the submitted folder), ``status.json``,
``state.json`` (the first workflow's last completed round; a later workflow's is ``state-<index>.json``,
and ``workflows.json`` lists the workflows that finished), models, checkpoints, validation JSON,
TensorBoard events and logs. A server that restarts picks up jobs that were running and resumes
them from their last completed round.

What is on disk when writes fail (a full disk):

- Progress (``status.json`` while a job runs: round, phase, sites done, "waiting"/"running") is
  best effort: a write that fails is logged once, the record stays in memory (the admin sees it)
  and the job goes on. A job is resumed after a restart if ``status.json`` says "running" or it
  has a ``state.json``, so a lost "running" cannot restart a job from round 0.
- Checkpoints (``state.json``, models) must be written: a failure fails the job, naming the file.
- A terminal state (finished, failed, aborted) is made durable first: an empty marker file
  ``ended.<status>`` (an inode, no data blocks, so it can be made on a full disk), then
  ``status.json``. A restarted server never resumes a job with a marker and rewrites a
  ``status.json`` that disagrees with it. Where even the marker cannot be made, the admin's
  message says that a restart will resume the job.
- The workspace is locked (``.fl-server.lock``) by one server at a time; holding it, the server
  removes the temp files of atomic writes that a kill left behind, before it writes anything.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fl.components.tracking import MAX_RECORD_TEXT, RECORD_KINDS
from fl.config import HostPolicy, build_component
from fl.filters import server_result_filters
from fl.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    create_empty,
    lock_exclusively,
    read_json,
    sweep_atomic_temps,
)
from fl.log import adapter
from fl.memory import release_memory
from fl.proto import federation_pb2 as pb
from fl.server.jobstore import JobError, JobSpec, read_job, zip_folder
from fl.server.sites import SiteRegistry, SiteSession
from fl.server.tasks import STATUS_INTERVAL_S, JobCommunicator, TaskBroker
from fl.server.transfers import BlobStore, TransferError
from fl.workflows.base import Controller, JobAborted, JobContext, RoundFailed

__all__ = ["TERMINAL", "JobManager", "JobRecord", "JobRun"]

TERMINAL = ("finished", "failed", "aborted")
ENDED_MARKER = "ended."  # + the terminal status: an empty file, made before status.json
LOCK_FILE = ".fl-server.lock"
log = adapter("fl.server", site="server")


def _clock(when: float) -> str:
    """A site's line time as HH:MM:SS (the server's clock where the site sent nonsense)."""
    if not math.isfinite(when) or not 0 <= when < 2**40:
        when = time.time()
    return time.strftime("%H:%M:%S", time.localtime(when))


@dataclass
class JobRecord:
    job_id: str
    name: str
    status: str = "submitted"
    submitted: float = field(default_factory=time.time)
    started: float = 0.0
    ended: float = 0.0
    message: str = ""
    round: int = 0
    num_rounds: int = 0
    sites: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_proto(self) -> pb.JobInfo:
        return pb.JobInfo(
            job_id=self.job_id,
            name=self.name,
            status=self.status,
            round=self.round,
            num_rounds=self.num_rounds,
            sites=self.sites,
            message=self.message,
            submitted=self.submitted,
            started=self.started,
            ended=self.ended,
            summary_json=json.dumps(self.summary),
        )


# A site's log of one job stops growing here (fl server --max-log-bytes); longer lines are cut.
DEFAULT_MAX_LOG_BYTES = 32 * 1024 * 1024
MAX_LOG_LINE_BYTES = 16 * 1024
_NOTICE = "[fl] "  # server notices start lines with this; site lines never do (see _clean_line)
_NOTICE_COUNT_WIDTH = 12
# C0 controls (newlines that would forge lines, terminal escapes) and DEL become U+FFFD; tabs stay.
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), 0x7F] if c != 0x09}


def _clean_line(line: str) -> bytes:
    """One log line as written: control characters replaced, at most MAX_LOG_LINE_BYTES, newline-ended."""
    text = line.rstrip("\r\n").translate(_CONTROLS)
    if text.startswith(_NOTICE):
        text = "\\" + text
    data = text.encode("utf-8", errors="replace")
    if len(data) > MAX_LOG_LINE_BYTES:
        cut = len(data) - MAX_LOG_LINE_BYTES
        data = data[:MAX_LOG_LINE_BYTES].decode("utf-8", errors="ignore").encode() + f" [{cut} bytes cut]".encode()
    return data + b"\n"


def _dropped_notice(source: str, count: int) -> bytes:
    """The line ending a capped log; fixed width so that it is rewritten in place as ``count`` grows."""
    count = min(count, 10**_NOTICE_COUNT_WIDTH - 1)
    return (
        f"{_NOTICE}{count:>{_NOTICE_COUNT_WIDTH}} lines dropped: {source} reached the log limit "
        "per site and job (fl server --max-log-bytes)\n"
    ).encode()


class JobLogs:
    """Per-site log files of a job, appendable and followable, each bounded by ``max_bytes``.

    Lines past a site's limit are dropped and counted: the file then ends with one line saying how
    many, kept up to date in place. The state is the file itself, so the limit holds across
    JobLogs instances (late lines after a job ended) and server restarts.
    """

    def __init__(self, folder: Path, *, max_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.cond = threading.Condition()
        self.closed = False
        #: source -> (when its last line arrived, the line): what a "still waiting" line shows.
        self.last_line: dict[str, tuple[float, str]] = {}

    def append(self, source: str, lines: list[str]) -> int:
        """Add ``source``'s lines to its log; returns how many were dropped at its limit."""
        if not lines:
            return 0
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in source) or "unknown"
        data = [_clean_line(line) for line in lines]
        with self.cond:
            fd = os.open(self.folder / f"{safe}.log", os.O_RDWR | os.O_CREAT, 0o644)
            with os.fdopen(fd, "r+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # other JobLogs of this job may write it too
                dropped = self._append_locked(f, safe, data)
            self.last_line[source] = (time.time(), lines[-1].rstrip("\n"))
            self.cond.notify_all()
        return dropped

    def _append_locked(self, f: BinaryIO, source: str, data: list[bytes]) -> int:
        size = f.seek(0, os.SEEK_END)
        notice_len = len(_dropped_notice(source, 0))
        already = _read_dropped(f, size, notice_len)
        kept = 0
        if already is None:
            room = self.max_bytes - size
            f.seek(size)
            while kept < len(data) and len(data[kept]) <= room:
                room -= len(data[kept])
                kept += 1
            f.write(b"".join(data[:kept]))
            content_end, already = f.tell(), 0
        else:
            content_end = size - notice_len
        dropped = len(data) - kept
        if dropped:
            f.seek(content_end)
            f.write(_dropped_notice(source, already + dropped))
        return dropped

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _read_dropped(f: BinaryIO, size: int, notice_len: int) -> int | None:
    """The count in the dropped-lines notice ending a log file, or None when it has none."""
    if size < notice_len:
        return None
    start = size - notice_len
    f.seek(start - 1 if start else 0)
    tail = f.read(notice_len + (1 if start else 0))
    if start and tail[:1] != b"\n":
        return None
    line = tail[-notice_len:]
    if not line.startswith(_NOTICE.encode()):
        return None
    count = line[len(_NOTICE) : len(_NOTICE) + _NOTICE_COUNT_WIDTH].strip()
    return int(count) if count.isdigit() else None


class WorkflowStates:
    """Each workflow's resumable state in its own file, and which workflows of the job have finished.

    A job runs its workflows in order (FedAvg, then cross-site evaluation, ...). The first keeps the
    un-keyed ``state.json`` (so jobs saved before states were keyed resume as they did); workflow ``i > 0``
    keeps ``state-<i>.json``. ``workflows.json`` lists finished workflows, which a resumed job skips.
    """

    DONE_FILE = "workflows.json"

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        self.run_dir = run_dir
        self.resume = resume
        self.index = 0

    def path(self, index: int) -> Path:
        """Where workflow ``index`` keeps its state."""
        return self.run_dir / ("state.json" if index == 0 else f"state-{index}.json")

    def save(self, state: Mapping[str, Any]) -> None:
        atomic_write_json(self.path(self.index), dict(state))

    def load(self) -> dict[str, Any] | None:
        """The running workflow's last saved state, or None when it starts fresh."""
        if not self.resume:
            return None
        state = read_json(self.path(self.index))
        return state if isinstance(state, dict) else None

    def finished(self) -> list[str]:
        """Ids of the workflows that finished before a restart (none for a fresh job)."""
        done = read_json(self.run_dir / self.DONE_FILE) if self.resume else None
        return [str(cid) for cid in done.get("finished", [])] if isinstance(done, dict) else []

    def run_all(self, workflows: Sequence[tuple[str, Controller]], ctx: JobContext) -> None:
        """Run ``workflows`` in order on ``ctx``, each with its own state; skip those that finished already."""
        finished = self.finished()
        for index, (cid, workflow) in enumerate(workflows):
            if cid in finished:
                ctx.log.info("workflow %r finished before the restart: not running it again", cid)
                continue
            self.index = index
            workflow.run(ctx)
            finished.append(cid)
            atomic_write_json(self.run_dir / self.DONE_FILE, {"finished": finished})


class JobRun:
    """A running job: the JobContext its workflow and components see, and its life on the sites."""

    def __init__(self, manager: JobManager, record: JobRecord, spec: JobSpec, *, resume: bool) -> None:
        self.manager = manager
        self.record = record
        self.spec = spec
        self.resume = resume
        self.job_id = record.job_id
        self.job_name = record.name
        self.run_dir = manager.job_dir(record.job_id)
        self.app_dir = spec.server_app
        self.policy = manager.policy
        self.abort_event = threading.Event()
        self.log = adapter("fl.server", site="server", job=record.job_id)
        self.communicator = JobCommunicator(
            manager.broker,
            self.job_id,
            self.abort_event,
            self.log,
            progress=lambda done, total: self.set_progress(sites_done=done, sites_total=total),
            status_interval=manager.status_interval,
            describe_site=self.describe_site,
        )
        self.components: dict[str, Any] = {}
        self.workflows: list[tuple[str, Controller]] = []
        self.states = WorkflowStates(self.run_dir, resume=resume)
        self.participants: list[str] = []
        self.failed_sites: dict[str, str] = {}
        self.logs = JobLogs(self.run_dir / "logs", max_bytes=manager.max_log_bytes)
        self._site_apps: dict[str, pb.BlobRef] = {}
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"fl-job-{self.job_id[:8]}", daemon=True)

    # ------------------------------------------------------------------ JobContext
    @property
    def sites(self) -> list[str]:
        """Participants that can take tasks now: connected and not failed."""
        connected = set(self.manager.registry.connected_sites())
        return [s for s in self.participants if s in connected and s not in self.failed_sites]

    def wait_for_sites(self, count: int, timeout: float) -> list[str]:
        """Wait until ``count`` participants can take tasks (or the deadline); returns them."""
        deadline = time.monotonic() + timeout
        while True:
            available = self.sites
            if len(available) >= count or time.monotonic() >= deadline:
                return available
            if len(self.participants) < count:
                raise RoundFailed(
                    f"the job runs on {len(self.participants)} sites ({', '.join(self.participants)}), fewer than "
                    f"the {count} needed: lower the workflow's min_clients/num_clients or run the job on more sites"
                )
            if len(self.participants) - len(self.failed_sites) < count:
                # Sites whose job failed do not come back on their own: don't wait for them.
                reasons = "; ".join(f"{s}: {r}" for s, r in sorted(self.failed_sites.items()))
                raise RoundFailed(f"{count} sites needed but the job failed on {len(self.failed_sites)}: {reasons}")
            if self.abort_event.wait(0.5):
                raise JobAborted("job aborted")

    def describe_site(self, site: str) -> str:
        """What was last heard from ``site`` in this job: its output and heartbeat, with their ages."""
        now = time.time()
        parts = []
        if site in self.failed_sites:
            parts.append(f"its job failed ({self.failed_sites[site]})")
        last = self.logs.last_line.get(site)
        if last is not None:
            line = last[1] if len(last[1]) <= 200 else last[1][:197] + "..."
            parts.append(f"last output {now - last[0]:.0f} s ago: {line!r}")
        else:
            parts.append("no output from its script yet")
        session = self.manager.registry.session(site)
        if session is None:
            parts.append("never registered")
        else:
            state = "connected" if session.connected else "lost"
            parts.append(f"{state}, last heard {now - session.last_seen:.0f} s ago")
        return ", ".join(parts)

    def fire(self, event: str, **data: Any) -> None:
        self.manager.job_event(self.job_id, event, data)
        for cid, component in list(self.components.items()):
            handler = getattr(component, "handle_event", None)
            if handler is None:
                continue
            try:
                handler(event, data, self)
            except Exception:
                self.log.exception("component %r failed on event %s", cid, event)
                if event in ("model_evaluated", "round_completed"):
                    raise

    def save_state(self, state: Mapping[str, Any]) -> None:
        self.states.save(state)

    def load_state(self) -> dict[str, Any] | None:
        return self.states.load()

    def set_progress(self, *, round: int | None = None, num_rounds: int | None = None, **summary: Any) -> None:
        with self._lock:
            if round is not None:
                self.record.round = round
            if num_rounds is not None:
                self.record.num_rounds = num_rounds
            self.record.summary.update(summary)
        self.manager.save_record(self.record)

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.thread.start()

    def abort(self, reason: str) -> None:
        self.record.message = reason
        self.abort_event.set()

    def _build(self) -> None:
        where = "config_fed_server.json"
        for entry in self.spec.server_config.get("components", []):
            cid, obj = build_component(entry, where=where)
            if cid in self.components:
                raise JobError(f"{where}: two components have the id {cid!r}")
            self.components[cid] = obj
        self.communicator.result_filters = server_result_filters(self.spec.server_config, where=where)
        for entry in self.spec.server_config["workflows"]:
            cid, obj = build_component(entry, where=where)
            if not isinstance(obj, Controller):
                raise JobError(f"{where}: workflow {cid!r} is not a workflow class")
            self.workflows.append((cid, obj))
            self.components[cid] = obj

    def _wait_for_sites(self) -> list[str]:
        named = self.spec.named_sites
        want_all = self.spec.all_sites_app is not None
        timeout = self.manager.site_wait_timeout
        need = len(named) if named and not want_all else self.spec.min_clients
        self.manager.set_status(self.record, "waiting", f"waiting for sites ({', '.join(named) or f'{need} sites'})")
        ready = self.manager.registry.wait_for(
            None if want_all else named, max(need, len(named)), timeout, self.abort_event
        )
        if self.abort_event.is_set():
            raise JobAborted("job aborted while waiting for sites")
        if len(ready) < self.spec.min_clients:
            missing = [s for s in named if s not in ready]
            raise JobError(
                f"only {len(ready)} of the {self.spec.min_clients} sites the job needs connected within {timeout:.0f} s"
                + (f"; missing: {', '.join(missing)}" if missing else "")
            )
        return sorted(ready)

    def _start_on_site(self, site: str) -> None:
        app = self.spec.app_for(site)
        if app is None:
            raise JobError(f"the job has no app for site {site}")
        with self._lock:
            ref = self._site_apps.get(app)
            if ref is None:
                archive = self.run_dir / "apps" / f"{app}.zip"
                atomic_write_bytes(archive, zip_folder(self.spec.folder / app), fsync=False)
                blob = self.manager.blobs.add(archive, sites=None)
                ref = self._site_apps[app] = pb.BlobRef(blob_id=blob.blob_id, size=blob.size, checksum=blob.checksum)
        start = pb.StartJob(
            job_id=self.job_id,
            job_name=self.job_name,
            app=ref,
            has_custom_code=self.spec.has_custom_code(app),
            num_rounds=self.record.num_rounds,
            env=self.manager.site_env(site, len(self.participants)),
        )
        self.manager.registry.enqueue(site, pb.PollReply(start_job=start))

    def site_joined(self, session: SiteSession) -> None:
        """A participant (re)registered: start the job there unless it still runs it."""
        if (
            session.name in self.participants
            and self.record.status == "running"
            and self.job_id not in session.running_jobs
        ):
            self.failed_sites.pop(session.name, None)
            self.manager.broker.site_back(session.name, self.job_id)
            self.log.info("%s restarted: starting the job there again", session.name)
            self._start_on_site(session.name)
            # Tasks it had in flight go to it again: the round can still complete with it.
            self.manager.broker.redispatch(session.name, self.job_id)

    def site_state(self, site: str, state: str, message: str) -> None:
        if state in ("failed", "finished") and self.record.status == "running":
            reason = message or f"the site's job ended ({state})"
            self.failed_sites[site] = reason
            self.manager.broker.fail_site(site, self.job_id, reason)

    def release(self) -> None:
        """The job is over here: stop offering its apps, and give the memory its transfers used back."""
        with self._lock:
            refs, self._site_apps = list(self._site_apps.values()), {}
        for ref in refs:
            self.manager.blobs.remove(ref.blob_id)
        self.manager.broker.forget_job(self.job_id)
        self.components.clear()  # the run object outlives its job a little (its thread): its state need not
        self.workflows.clear()
        release_memory()

    def _end_on_sites(self, status: str, message: str) -> None:
        for site in self.participants:
            # Its tasks, and its start where a site has not polled since (told to come back later): a site
            # must not start a job that is over, whose app the server no longer offers.
            self.manager.registry.drop_directives(site, self._is_own_task_or_start)
            self.manager.registry.enqueue(
                site, pb.PollReply(end_job=pb.EndJob(job_id=self.job_id, status=status, message=message))
            )

    def _is_own_task_or_start(self, directive: pb.PollReply) -> bool:
        kind = directive.WhichOneof("directive")
        return (kind == "task" and directive.task.job_id == self.job_id) or (
            kind == "start_job" and directive.start_job.job_id == self.job_id
        )

    def _run(self) -> None:
        status, message = "failed", ""
        try:
            self._build()
            self.participants = self._wait_for_sites()
            self.record.sites = self.participants
            self.record.started = self.record.started or time.time()
            self.manager.set_status(self.record, "running", "")
            self.log.info("job %s running on %s", self.job_name, ", ".join(self.participants))
            registry = self.manager.registry
            for site in self.participants:
                session = registry.session(site)
                if not (self.resume and session is not None and self.job_id in session.running_jobs):
                    self._start_on_site(site)
            self.fire("job_started")
            self.states.run_all(self.workflows, self)
            status, message = "finished", ""
        except JobAborted:
            status, message = "aborted", self.record.message or "aborted"
        except Exception as exc:  # the job fails; the server goes on
            status, message = "failed", str(exc) or type(exc).__name__
            if not isinstance(exc, JobError | ValueError | RuntimeError):
                self.log.exception("job failed")
        self._finish(status, message)

    def _finish(self, status: str, message: str) -> None:
        if self.manager.stopping.is_set() and status != "finished":
            # The server is stopping, not the job: leave it "running" to resume after restart.
            self.log.info("server stopping; the job will resume from its last completed round")
            self.logs.close()
            self.manager.job_done(self, None, "")
            return
        self.manager.mark_ended(self.record, status)  # before anything else: a restart must not resume it
        self._end_on_sites(status, message)
        try:
            self.fire("job_finished", status=status)
        except Exception:
            self.log.exception("a component failed while the job ended")
        self.logs.close()
        self.manager.job_done(self, status, message)


class JobManager:
    """Accepts jobs, runs them when their sites are connected, remembers them across restarts."""

    def __init__(
        self,
        workspace: Path,
        registry: SiteRegistry,
        broker: TaskBroker,
        blobs: BlobStore,
        *,
        site_wait_timeout: float = 600.0,
        max_running: int = 1,
        site_env: Callable[[str, int], dict[str, str]] | None = None,
        status_interval: float = STATUS_INTERVAL_S,
        policy: HostPolicy | None = None,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
    ) -> None:
        self.workspace = workspace
        self.status_interval = status_interval
        self.policy = policy or HostPolicy()
        self.jobs_dir = workspace / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_workspace()
        self.registry = registry
        self.broker = broker
        self.blobs = blobs
        self.site_wait_timeout = site_wait_timeout
        self.max_running = max_running
        self.max_log_bytes = max_log_bytes
        self._site_env = site_env
        self.records: dict[str, JobRecord] = {}
        self.runs: dict[str, JobRun] = {}
        self._queue: list[tuple[str, bool]] = []  # (job id, resume)
        self._lock = threading.Condition()
        self.stopping = threading.Event()
        self._listeners: list[Callable[[JobRecord], None]] = []
        self._event_listeners: list[Callable[[str, str, Mapping[str, Any]], None]] = []
        self._unsaved: set[str] = set()  # jobs whose status.json could not be written lately
        self._scheduler = threading.Thread(target=self._schedule, name="fl-scheduler", daemon=True)
        registry.on_site_joined(self._site_joined)
        self._load()

    # ------------------------------------------------------------------ records
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def on_change(self, listener: Callable[[JobRecord], None]) -> None:
        self._listeners.append(listener)

    def on_job_event(self, listener: Callable[[str, str, Mapping[str, Any]], None]) -> None:
        """``listener(job_id, event, data)`` for every event a job fires (metrics, audit)."""
        self._event_listeners.append(listener)

    def job_event(self, job_id: str, event: str, data: Mapping[str, Any]) -> None:
        for listener in self._event_listeners:
            try:
                listener(job_id, event, data)
            except Exception:
                log.exception("job %s: event listener failed on %s", job_id, event)

    def _take_workspace(self) -> int:
        """Lock the workspace for this server, then sweep the temp files a killed writer left."""
        fd = lock_exclusively(self.workspace / LOCK_FILE)
        # A job's submitted folder holds the admin's files, never temp files of fl's writes.
        swept = sweep_atomic_temps(self.workspace, skip=lambda d: d.name == "job" and d.parent.parent == self.jobs_dir)
        if swept:
            names = ", ".join(str(p.relative_to(self.workspace)) for p in swept[:5])
            log.info("removed %d temp file(s) of writes a kill interrupted: %s", len(swept), names)
        return fd

    def _write_record(self, record: JobRecord) -> None:
        atomic_write_json(self.job_dir(record.job_id) / "status.json", asdict(record))

    def save_record(self, record: JobRecord) -> str | None:
        """Write ``status.json``, best effort: a failure is logged once per job and returned, not raised."""
        error = None
        try:
            self._write_record(record)
        except OSError as exc:
            error = str(exc)
            if record.job_id not in self._unsaved:
                self._unsaved.add(record.job_id)
                log.warning("job %s: cannot write status.json (%s); its progress is kept in memory", record.job_id, exc)
        else:
            if record.job_id in self._unsaved:
                self._unsaved.discard(record.job_id)
                log.info("job %s: status.json written again", record.job_id)
        self._notify(record)
        return error

    def _notify(self, record: JobRecord) -> None:
        for listener in self._listeners:
            listener(record)

    def mark_ended(self, record: JobRecord, status: str) -> str | None:
        """Make the job's terminal marker; returns why it could not be made, or None."""
        try:
            create_empty(self.job_dir(record.job_id) / f"{ENDED_MARKER}{status}")
        except OSError as exc:
            log.error("job %s: cannot record that it %s (%s); a restart would resume it", record.job_id, status, exc)
            return str(exc)
        return None

    def set_status(self, record: JobRecord, status: str, message: str) -> None:
        unmarked = self.mark_ended(record, status) if status in TERMINAL else None
        record.status = status
        record.message = message
        if status in TERMINAL:
            record.ended = time.time()
        unsaved = self.save_record(record)
        if unsaved is not None and status in TERMINAL:
            record.message += (
                f" (its status could not be saved: {unmarked}; a restarted server would resume it)"
                if unmarked is not None
                else f" (status.json could not be written: {unsaved}; it stays {status} after a restart)"
            )
        with self._lock:
            self._lock.notify_all()

    def site_env(self, site: str, n_sites: int) -> dict[str, str]:
        return self._site_env(site, n_sites) if self._site_env else {}

    def _load(self) -> None:
        for status_file in sorted(self.jobs_dir.glob("*/status.json")):
            try:
                record = JobRecord(**read_json(status_file))
            except (TypeError, ValueError, OSError):
                log.warning("ignoring unreadable %s", status_file)
                continue
            self.records[record.job_id] = record
            self._apply_marker(record)
            if record.status in ("running", "waiting", "submitted"):
                resume = record.status == "running" or (status_file.parent / "state.json").exists()
                self._queue.append((record.job_id, resume))
                log.info("job %s (%s) will %s", record.job_id, record.name, "resume" if resume else "start")

    def _apply_marker(self, record: JobRecord) -> None:
        """A job whose terminal marker exists ended, whatever its status.json says: make it say so."""
        markers = [p for p in self.job_dir(record.job_id).glob(f"{ENDED_MARKER}*") if p.suffix[1:] in TERMINAL]
        if not markers or record.status == markers[0].suffix[1:]:
            return
        record.status = markers[0].suffix[1:]
        record.ended = record.ended or markers[0].stat().st_mtime
        record.message = "the job ended; its last status.json could not be written then (disk full?)"
        log.warning(
            "job %s (%s) %s before the restart; status.json now says so", record.job_id, record.name, record.status
        )
        self.save_record(record)

    # ------------------------------------------------------------------ API
    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self.stopping.set()
        for run in list(self.runs.values()):
            run.abort_event.set()
        with self._lock:
            self._lock.notify_all()
        for run in list(self.runs.values()):
            run.thread.join(timeout=10)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the next server on this workspace may start
            self._lock_fd = -1

    def submit(self, folder: Path) -> JobRecord:
        """Check a job folder (already unpacked into a staging folder) and queue it."""
        spec = read_job(folder, self.policy)
        job_id = str(uuid.uuid4())
        target = self.job_dir(job_id)
        record = JobRecord(job_id=job_id, name=spec.name, num_rounds=spec.num_rounds)
        try:
            target.mkdir(parents=True)
            shutil.move(str(folder), target / "job")
            self._write_record(record)  # a job the server cannot remember is refused, not accepted
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        self.records[job_id] = record
        self._notify(record)
        with self._lock:
            self._queue.append((job_id, False))
            self._lock.notify_all()
        log.info("job %s (%s) submitted", job_id, spec.name)
        return record

    def get(self, job_id: str) -> JobRecord | None:
        record = self.records.get(job_id)
        if record is None:
            matches = [r for r in self.records.values() if r.job_id.startswith(job_id)] if len(job_id) >= 4 else []
            if len(matches) == 1:
                record = matches[0]
        return record

    def is_active_for(self, job_id: str, site: str) -> bool:
        """Whether ``site`` should keep running ``job_id`` (unknown or ended jobs: no)."""
        record = self.records.get(job_id)
        if record is None or record.status in TERMINAL:
            return False
        run = self.runs.get(job_id)
        return run is None or not run.participants or site in run.participants

    def abort(self, job_id: str, reason: str = "aborted by admin") -> JobRecord | None:
        """Abort a job; ``reason`` (who or what ended it) becomes its status message."""
        record = self.get(job_id)
        if record is None:
            return None
        run = self.runs.get(record.job_id)
        if run is not None:
            run.abort(reason)
        elif record.status not in TERMINAL:
            with self._lock:
                self._queue = [(j, r) for j, r in self._queue if j != record.job_id]
            self.set_status(record, "aborted", f"{reason} (before it started)")
        return record

    def wait(self, job_id: str, timeout: float | None) -> JobRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                record = self.records[job_id]
                if record.status in TERMINAL:
                    return record
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return record
                self._lock.wait(1.0 if remaining is None else min(1.0, remaining))

    def report(self, site: str, request: pb.ReportRequest) -> None:
        """A site's metrics, output lines and job state changes.

        Lines past the site's log limit are dropped; the rest of the report still applies, then
        RESOURCE_EXHAUSTED (a :class:`TransferError`) tells the site.
        """
        run = self.runs.get(request.job_id)
        record = self.records.get(request.job_id)
        participants = run.participants if run is not None else (record.sites if record is not None else [])
        if site not in participants:
            raise PermissionError(f"site {site} does not take part in job {request.job_id}")
        dropped = 0
        if request.logs:
            lines = [f"{_clock(li.time)} {li.line}" for li in request.logs]
            if run is not None:
                dropped = run.logs.append(site, lines)
            else:  # the last lines of a job that just ended still belong in its logs
                logs = JobLogs(self.job_dir(request.job_id) / "logs", max_bytes=self.max_log_bytes)
                dropped = logs.append(site, lines)
        if run is not None:
            self._apply_report(run, site, request)
        if dropped:
            raise TransferError(
                "RESOURCE_EXHAUSTED",
                f"site {site}: {dropped} of {len(request.logs)} log lines dropped: its log of job {request.job_id} "
                f"reached the limit of {self.max_log_bytes} bytes per site",
            )

    def _apply_report(self, run: JobRun, site: str, request: pb.ReportRequest) -> None:
        """The metrics and job state of a report to a running job."""
        if request.metrics:
            records = [
                {
                    "tag": m.tag,
                    "value": m.value,
                    "step": m.step,
                    "wall_time": m.wall_time,
                    "group_member": m.group_member,
                    "kind": m.kind,
                    "text": m.text[:MAX_RECORD_TEXT],
                }
                for m in request.metrics
                if not m.kind or m.kind in RECORD_KINDS  # a kind no receiver knows is dropped here
            ]
            run.fire("analytics", site=site, records=records)
        if request.job_state:
            if request.job_state == "failed":
                run.log.error("site %s: job failed: %s", site, request.message)
            run.site_state(site, request.job_state, request.message)

    # ------------------------------------------------------------------ scheduling
    def _site_joined(self, session: SiteSession, previous: SiteSession | None) -> None:
        for run in list(self.runs.values()):
            run.site_joined(session)
        with self._lock:
            self._lock.notify_all()

    def _schedule(self) -> None:
        while not self.stopping.is_set():
            with self._lock:
                while not self.stopping.is_set() and (not self._queue or len(self.runs) >= self.max_running):
                    self._lock.wait(1.0)
                if self.stopping.is_set():
                    return
                job_id, resume = self._queue.pop(0)
            record = self.records[job_id]
            try:
                spec = read_job(self.job_dir(job_id) / "job", self.policy)
            except JobError as exc:
                self.set_status(record, "failed", f"job folder unusable: {exc}")
                continue
            run = JobRun(self, record, spec, resume=resume)
            self.runs[job_id] = run
            run.start()

    def job_done(self, run: JobRun, status: str | None, message: str) -> None:
        self.runs.pop(run.job_id, None)
        run.release()
        if status is not None:
            self.set_status(run.record, status, message)
            log.info(
                "job %s %s%s",
                run.job_id,
                status,
                f": {message}" if message else "",
            )
        with self._lock:
            self._lock.notify_all()
