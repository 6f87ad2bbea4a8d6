"""One job on a site: unpack its app, run its script in a process of its own, relay tasks and results.

The script talks to this runner over a socketpair, or (ranks of ``torch.distributed.run``, see
:mod:`fl.site.launch`) a unix socket its rank 0 connects to (:mod:`fl.channel`); its output is read line by
line, logged with site, job and round, and forwarded to the server. If the script dies, the job
fails on this site at once with the script's exit code and last lines, so that the server does not
wait out a deadline.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fl.channel import ChannelClosed, ChannelListener, LineChannel
from fl.checksum import file_checksum
from fl.components.convert_to_fed_event import ConvertToFedEvent
from fl.components.script_executor import LAUNCH_ONCE_ENV, ScriptExecutor
from fl.components.tracking import MAX_RECORD_TEXT
from fl.config import ConfigError, build_component, check_config, load_config, resolve_class
from fl.filters import FilterChain, FilterContext, FilterError, replace_file
from fl.memory import training_memory_env
from fl.proto import federation_pb2 as pb
from fl.rounds import log_round
from fl.server.jobstore import JobError, extract_zip
from fl.site import fork_server
from fl.site.fork_server import ForkedScript
from fl.site.kube_launch import relay_command
from fl.site.launch import Launch, training_command
from fl.site.script_process import start_forked, start_script, stop_group, wait_unreaped
from fl.site.transfers import TransferFailed, download_blob, file_reader, upload_stream
from fl.transport.bulk import BULK_UPLOAD_CHUNK_BYTES

if TYPE_CHECKING:
    from fl.site.agent import SiteAgent

__all__ = ["JobRunner"]

LAST_LINES = 40
END_GRACE_S = 30.0
#: Seconds the reporter gathers a script's output lines and metrics into one Report after the first.
REPORT_INTERVAL_S = 0.5
#: What a per-task run's script hears when it asks for a second task: its run is over, not the job.
RUN_OVER = {"op": "end", "status": "run_over", "message": "this run's task is done (launch_once=False)"}
_fallback_logged = False  # the Popen fallback (no fork server for this script) is said once a process


class _Ended:
    """Marker in the task queue: the job is over."""

    def __init__(self, status: str, message: str) -> None:
        self.status = status
        self.message = message


class _EitherStop:
    """Set when the job stops or when ``reasons`` holds one (``is_set`` as a threading.Event's)."""

    def __init__(self, event: threading.Event, reasons: list[str]) -> None:
        self.event = event
        self.reasons = reasons

    def is_set(self) -> bool:
        return self.event.is_set() or bool(self.reasons)


class JobRunner:
    """Runs one job's script on a site and relays between it and the server."""

    def __init__(self, agent: SiteAgent, start: pb.StartJob) -> None:
        self.agent = agent
        self.start_msg = start
        self.job_id = start.job_id
        self.job_dir = agent.workspace / start.job_id
        self.exchange = (agent.exchange_root / start.job_id) if agent.exchange_root else self.job_dir / "exchange"
        self.log = agent.log.bind(job=start.job_id)
        self.round: int | None = None
        #: The last task handed to the script: the round its output lines are tagged with.
        self.current_task: pb.Task | None = None
        self.tasks: queue.Queue[tuple[pb.Task, Path | None] | _Ended] = queue.Queue()
        self.current: pb.Task | None = None
        self.process: subprocess.Popen[bytes] | ForkedScript | None = None
        self.last_lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)
        self.forward_metrics = True
        self.executor: ScriptExecutor | None = None
        #: The unix socket rank 0 of a torch.distributed.run script connects to (None: a socketpair).
        self._listener: ChannelListener | None = None
        #: Whether the script runs as ranks of torch.distributed.run (set with its command).
        self._distributed = False
        #: Set once the script's process has exited (seen without reaping it: its pid is its group's id).
        self._script_exited = threading.Event()
        self.stop_event = threading.Event()
        self.ended: _Ended | None = None
        self.done = threading.Event()
        self._outbox_lines: list[pb.LogLine] = []
        self._outbox_metrics: list[pb.MetricRecord] = []
        self._outbox_lock = threading.Lock()
        #: set when lines or metrics wait in the outbox, or the job is done: the reporter sleeps until then
        self._outbox_ready = threading.Event()
        self._failed_reported = False
        self._gate_held = False
        #: launch_once (the default) or per task: set from the job's executor and the host's default at setup
        self.launch_once = True
        #: per task: the task (and its model) the script being started is to get, until it asks for it
        self._run_item: tuple[pb.Task, Path | None] | None = None
        self._command: list[str] = []
        self._fork_socket: Path | None = None  # where each run is forked (the run's fork server, where there is one)
        self._env: dict[str, str] = {}
        self.data_filters = FilterChain("task_data_filters")
        self.result_filters = FilterChain("task_result_filters")
        #: set once the job's config (its filters) is read, or its setup failed: tasks wait for it
        self._configured = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"fl-job-{self.job_id[:8]}", daemon=True)

    # ------------------------------------------------------------------ control from the agent
    def start(self) -> None:
        self.thread.start()
        threading.Thread(target=self._flush_loop, name="fl-report", daemon=True).start()

    def add_task(self, task: pb.Task) -> None:
        """A task directive arrived: fetch its model now and hand it to the script when it asks; or,
        per task behind a run gate, queue it and fetch its model once its run has a place."""
        if self._configured.is_set() and self._defers_fetch():
            self.tasks.put((task, None))
            return
        threading.Thread(target=self._prepare_task, args=(task,), name="fl-fetch", daemon=True).start()

    def _defers_fetch(self) -> bool:
        """Per task behind a run gate (a simulation of more sites than run at once): a model is
        fetched when its run gets a place, so the exchange holds the models of the runs that have
        one, not one for every site waiting its turn, and a round's downloads come a few at a time."""
        return not self.launch_once and self.agent.task_gate is not None

    def end(self, status: str, message: str) -> None:
        """The server ended the job: tell the script (at its next request) and let it exit."""
        if self.ended is None:
            self.ended = _Ended(status, message)
            self.tasks.put(self.ended)
            if self.agent.task_gate is not None:
                self.agent.task_gate.wake()  # a run of this job waiting for a place gives up
            threading.Thread(target=self._reap_after_end, daemon=True).start()

    def stop(self, reason: str) -> None:
        """Stop at once (job aborted or unknown to the server, or the site is stopping)."""
        self.log.info("stopping job: %s", reason)
        self.stop_event.set()
        self.end("aborted", reason)
        self._kill_script()

    # ------------------------------------------------------------------ the job
    def _prepare_task(self, task: pb.Task) -> None:
        self._configured.wait()  # a task may come while the app is still being unpacked
        if self._defers_fetch():
            self.tasks.put((task, None))
            return
        fetched, path = self._fetch(task)
        if fetched:
            self.tasks.put((task, path))

    def _fetch(self, task: pb.Task) -> tuple[bool, Path | None]:
        """Download the task's model (if it has one) into the exchange and run the data filters on it:
        (True, its path or None), or (False, None) once the failure is reported to the server. Called
        once the app is configured (its data filters known)."""
        path: Path | None = None
        try:
            if task.model.blob_id:
                path = self.exchange / f"task-{task.task_id}.safetensors"
                started = time.monotonic()
                if self._download_model(task, path):
                    self.log.info("model shared with another site of this host (one download)", extra=_tag(task))
                else:
                    self._log_transfer("model downloaded", task.model.size, started, task)
                self._filter(self.data_filters, task, path, task.params_type or "FULL", None, {})
        except TransferFailed as exc:
            self.log.error("could not fetch the model of task %s: %s", task.name, exc, extra=_tag(task))
            self._submit_error(task, f"model download failed: {exc}")
            return False, None
        except FilterError as exc:
            self.log.error("task %s refused: %s", task.name, exc, extra=_tag(task))
            self._submit_error(task, str(exc))
            if path is not None:
                path.unlink(missing_ok=True)
            return False, None
        return True, path

    def _download_model(self, task: pb.Task, path: Path) -> bool:
        """Download ``task``'s model to ``path``; True if it came as a link to another site's copy."""

        def download() -> None:
            download_blob(
                self.agent.bulk,
                self.agent.current_session,
                task.model,
                path,
                deadline=task.deadline or time.time() + 3600,
                stop=self.stop_event,
                meter=self.agent.metrics.transfers,
            )

        shared = self.agent.shared_downloads
        if shared is not None and not self.data_filters.for_task(task.name):  # a filtered file is the site's own
            return shared.fetch(task.model.checksum, task.model.size, path, download)
        download()
        return False

    def _run(self) -> None:
        try:
            try:
                self._setup()
            finally:
                self._configured.set()
            self._prepare_launch()
            if self.launch_once:
                self._start_script()
            self._report(job_state="running")
        except (JobError, ConfigError, TransferFailed, OSError, ValueError) as exc:  # a LaunchError is a ValueError
            self._fail(f"could not start the job: {exc}")
            self._done()
            return
        if self.launch_once:
            code = self._wait_script()
            if self.ended is None and not self.stop_event.is_set():
                tail = "\n".join(self.last_lines) or "(no output)"
                self._fail(f"training script exited with code {code} before the job ended. Last output:\n{tail}")
            else:
                self.log.info("training script exited (code %d)", code)
                self._report_finished()
        elif self._run_per_task():
            self._report_finished()
        self._release_gate()
        shutil.rmtree(self.exchange, ignore_errors=True)
        self._done()

    def _done(self) -> None:
        self.done.set()
        self._outbox_ready.set()  # the reporter sends what is left and ends

    def _report_finished(self) -> None:
        self._report(job_state="finished" if self.ended is None or self.ended.status == "finished" else "")

    def _wait_script(self) -> int:
        """Wait for the script (and its output) to end; its exit code."""
        assert self.process is not None
        self._end_group_when_script_exits()
        self._script_exited.set()
        code = self.process.wait()
        self._drain_done.wait(5)
        return code

    def _run_per_task(self) -> bool:
        """launch_once=False: one script run per task, each holding the task gate; False if one failed."""
        while True:
            item = self.tasks.get()
            if isinstance(item, _Ended):
                self.tasks.put(item)
                return True
            if not self._acquire_run_gate():
                return True
            task, path = item
            if task.model.blob_id and path is None:  # deferred until its run had a place
                fetched, path = self._fetch(task)
                if not fetched:
                    self._release_gate()
                    continue
            self._run_item = (task, path)
            self.current_task = task
            self.round = task.round
            try:
                self._start_script()
            except OSError as exc:
                self._release_gate()
                self._fail(f"could not start the training script for task {task.name}: {exc}")
                return False
            code = self._wait_script()
            self._release_gate()
            if self.stop_event.is_set():
                return True
            answered = self._run_item is None and self.current is None
            if code != 0 or not answered:
                unanswered = "" if answered else f" without sending the result of task {task.name}"
                tail = "\n".join(self.last_lines) or "(no output)"
                self._fail(f"training script exited with code {code}{unanswered}. Last output:\n{tail}")
                return False

    def _acquire_run_gate(self) -> bool:
        """Per task: wait for a place among the scripts allowed at once; False if the job ended meanwhile."""
        gate = self.agent.task_gate
        if gate is not None:
            if not gate.acquire(give_up=lambda: self.stop_event.is_set() or self.ended is not None):
                return False
            self._gate_held = True
        if self.stop_event.is_set():
            self._release_gate()
            return False
        return True

    def _setup(self) -> None:
        if self.start_msg.has_custom_code and not self.agent.accepts_custom_code:
            raise JobError("this site's policy refuses jobs that carry custom code (--no-custom-code)")
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.exchange.mkdir(parents=True, exist_ok=True)
        app = self._unpack_app()
        config = load_config(app / "config" / "config_fed_client.json")
        check_config(config, custom_dir=app / "custom", where="config_fed_client.json")
        executors = config.get("executors") or []
        if len(executors) != 1:
            raise JobError(f"config_fed_client.json must have exactly one executor, found {len(executors)}")
        spec = executors[0].get("executor") if isinstance(executors[0], dict) else None
        if not isinstance(spec, dict):
            raise JobError("config_fed_client.json: executor entry needs an 'executor' object")
        executor_cls = resolve_class(spec.get("path", ""))
        if not issubclass(executor_cls, ScriptExecutor):
            raise JobError(f"{spec.get('path')}: fl sites run jobs through ScriptExecutor")
        _, executor = build_component({"id": "executor", **spec}, where="config_fed_client.json")
        self.executor = executor
        host_default = self.start_msg.env.get(LAUNCH_ONCE_ENV, "1") != "0"
        self.launch_once = host_default if executor.launch_once is None else executor.launch_once
        self.forward_metrics = False
        self.data_filters = FilterChain.from_config(config, "task_data_filters", where="config_fed_client.json")
        self.result_filters = FilterChain.from_config(config, "task_result_filters", where="config_fed_client.json")
        for entry in config.get("components", []):
            _, component = build_component(entry, where="config_fed_client.json")
            if isinstance(component, ConvertToFedEvent) and component.forwards_analytics:
                self.forward_metrics = True

    def _unpack_app(self) -> Path:
        """The job's app in ``<job folder>/app``: downloaded and unpacked, or (sites sharing downloads, as the
        simulator's do) a link to the one copy unpacked for every site that got the same archive."""

        def unpack(folder: Path) -> None:
            archive = folder.with_name(folder.name + ".zip")
            download_blob(
                self.agent.bulk,
                self.agent.current_session,
                self.start_msg.app,
                archive,
                deadline=time.time() + 600,
                stop=self.stop_event,
                meter=self.agent.metrics.transfers,
            )
            try:
                extract_zip(archive, folder)
            finally:
                archive.unlink(missing_ok=True)

        app = self.job_dir / "app"
        if app.is_symlink():
            app.unlink()
        shared = self.agent.shared_downloads
        source = shared.unpacked(self.start_msg.app.checksum, unpack) if shared is not None else None
        if source is None:
            unpack(app)
        else:
            shutil.rmtree(app, ignore_errors=True)
            app.symlink_to(source, target_is_directory=True)
        return app

    def _prepare_launch(self) -> None:
        """The script's command and environment (the same for every run of it)."""
        assert self.executor is not None
        app = self.job_dir / "app"
        custom = app / "custom"
        script = (custom / self.executor.task_script_path).resolve()
        if custom.resolve() not in script.parents or not script.is_file():
            raise JobError(
                f"task_script_path {self.executor.task_script_path!r} is not a file in the job's custom code"
            )
        launch = training_command(
            self.executor.command, script, self.executor.task_script_args, self.agent.nproc_per_node
        )
        self._distributed = launch.distributed
        env = dict(os.environ)
        env.update(self.start_msg.env)
        for name in ("FL_CHANNEL_FD", "FL_CHANNEL_PATH", "FL_CHANNEL_TOKEN"):
            env.pop(name, None)  # the job's env names no channel: this runner's are the only ones
        own = {
            "FL_SITE_NAME": self.agent.name,
            "FL_JOB_ID": self.job_id,
            "FL_STATE_DIR": str(self.job_dir / "state"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(custom), env.get("PYTHONPATH", "")) if p),
            **training_memory_env(env),
        }
        env.update(own)
        self._env = env
        # The script's environment beyond the site's own: what a job pod must be given too.
        self._command = self._script_command(script, launch, [*self.start_msg.env, *own])

    def _script_command(self, script: Path, launch: Launch, env_names: list[str]) -> list[str]:
        """argv of one run: the Kubernetes relay (the script runs in a job pod), the script and its
        arguments for this process's fork server where one runs (``_fork_socket`` then names it), else
        the interpreter (or torch.distributed.run)."""
        global _fallback_logged
        assert self.executor is not None
        if self.agent.launcher_config is not None:
            # The relay is one process on a socketpair; in the pod its shim gives torchrun's rank 0 a socket.
            self._distributed = False
            return relay_command(
                self.agent.launcher_config,
                self.job_dir,
                self.exchange,
                env_names,
                launch.argv,
                distributed=launch.distributed,
            )
        warm = fork_server.active_socket()
        plain = bool(self.executor.command) or launch.distributed
        if warm is not None and not plain:
            self._fork_socket = warm
            return [str(script), *shlex.split(self.executor.task_script_args or "")]
        if warm is not None and not _fallback_logged:
            _fallback_logged = True
            self.log.info(
                "the job names its own launcher (command or ranks): its scripts start as processes, not forks"
            )
        return launch.argv

    def _start_script(self) -> None:
        """Start one run of the script, with a fresh channel and output reader."""
        command = self._command
        self.last_lines.clear()
        self._script_exited.clear()
        log = self.log.info if self.launch_once else self.log.debug
        how = " (a fork of the warm worker, torch imported)" if self._fork_socket is not None else ""
        log("starting training script%s: %s", how, _shown(command))
        # The Kubernetes relay deletes the job's pod when it gets SIGTERM: it must not die of SIGKILL.
        death_signal = signal.SIGTERM if self.agent.launcher_config is not None else signal.SIGKILL
        if self._fork_socket is not None:
            # A run per task may reuse a worker of the job's; a script that runs once is a fork of its own.
            key = None if self.launch_once else self.job_id
            started = start_forked(self._fork_socket, command, cwd=self.job_dir, env=self._env, key=key)
        else:  # torchrun's ranks inherit no fd: rank 0 connects to a socket in the job folder
            started = start_script(
                command,
                distributed=self._distributed,
                channel_dir=self.job_dir,
                cwd=self.job_dir,
                env=self._env,
                death_signal=death_signal,
            )
        self.process, self._listener = started.process, started.listener
        channel = LineChannel(started.parent) if started.parent is not None else None
        self._drain_done = threading.Event()
        threading.Thread(target=self._pump_output, name="fl-output", daemon=True).start()
        threading.Thread(target=self._serve_channel, args=(channel,), name="fl-channel", daemon=True).start()

    def _pump_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.last_lines.append(line)
            extra = _tag(self.current_task) if self.current_task is not None else {}
            self.log.info("%s", line, extra=extra)
            with self._outbox_lock:
                if len(self._outbox_lines) < 10_000:
                    self._outbox_lines.append(
                        pb.LogLine(time=time.time(), line=line, site=self.agent.name, round=(self.round or 0) + 1)
                    )
            self._outbox_ready.set()
        self._drain_done.set()

    # ------------------------------------------------------------------ the script's requests
    def _serve_channel(self, channel: LineChannel | None) -> None:
        """Answer one script run's requests: on ``channel``, or (torchrun ranks) on rank 0's connection."""
        if channel is None:
            listener = self._listener
            assert listener is not None
            accepted = listener.accept(lambda: not (self._script_exited.is_set() or self.stop_event.is_set()))
            if accepted is None:
                return
            channel, hello = accepted
            self.log.info("training script connected: rank %s, pid %s", hello.get("rank"), hello.get("pid"))
            self._answer(channel, hello)
        try:
            while True:
                self._answer(channel, channel.recv())
        except (ChannelClosed, ValueError):
            pass
        finally:
            channel.close()

    def _answer(self, channel: LineChannel, message: dict[str, Any]) -> None:
        """Carry out one request of the script and send its reply (the requests that have one)."""
        op = message["op"]
        if op == "hello":
            channel.send(self._welcome())
        elif op == "next_task":
            channel.send(self._next_task(message.get("timeout")))
        elif op == "result":
            accepted, text = self._deliver(message, channel)
            channel.send({"op": "ack", "accepted": accepted, "message": text})
        elif op == "metrics":
            self._queue_metrics(message.get("records") or [])
        elif op == "bye":
            pass
        else:
            self.log.warning("unknown request from the script: %r", op)

    def _welcome(self) -> dict[str, Any]:
        assert self.executor is not None
        threads = self.start_msg.env.get("FL_TORCH_THREADS")
        return {
            "op": "welcome",
            "site_name": self.agent.name,
            "job_id": self.job_id,
            "job_name": self.start_msg.job_name,
            "num_rounds": self.start_msg.num_rounds,
            "params_format": self.executor.params_exchange_format,
            "transfer_type": self.executor.params_transfer_type,
            "torch_threads": int(threads) if threads else None,
        }

    def _next_task(self, timeout: float | None) -> dict[str, Any]:
        if not self.launch_once:
            run_item, self._run_item = self._run_item, None
            return RUN_OVER if run_item is None else self._hand_out(*run_item)
        self._release_gate()
        try:
            waits = isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 <= timeout < float("inf")
            item = self.tasks.get(timeout=timeout) if waits else self.tasks.get()
        except queue.Empty:
            return {"op": "timeout"}
        if isinstance(item, _Ended):
            self.tasks.put(item)  # every later request sees the end too
            return {"op": "end", "status": item.status, "message": item.message}
        task, path = item
        if self.agent.task_gate is not None:
            self.agent.task_gate.acquire()
            self._gate_held = True
        return self._hand_out(task, path)

    def _hand_out(self, task: pb.Task, path: Path | None) -> dict[str, Any]:
        """The reply that gives the script ``task``."""
        self.current = task
        self.round = task.round
        self.current_task = task
        self.log.info("task %s received", task.name, extra=_tag(task))
        return {
            "op": "task",
            "task": {
                "task_id": task.task_id,
                "name": task.name,
                "round": task.round,
                "num_rounds": task.num_rounds,
                "meta": json.loads(task.meta_json or "{}"),
                "params_type": task.params_type or "FULL",
                "model_path": str(path) if path else None,
                # The script removes the model file once loaded, unless a result filter needs it as the base.
                "model_disposable": not self.result_filters.for_task(task.name),
                "result_path": str(self.exchange / f"result-{task.task_id}.safetensors"),
                # The result comes back on the channel (no file) unless a result filter needs the file,
                # or a Kubernetes job pod's relay carries it as one.
                "result_stream": self.agent.launcher_config is None and not self.result_filters.for_task(task.name),
            },
        }

    def _upload_from_script(self, task: pb.Task, message: dict[str, Any], channel: LineChannel) -> str:
        """Upload the result the script holds in memory, pulling its bytes over the channel as they go out."""
        size, checksum = message["stream"].get("size"), message.get("checksum")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(checksum, str):
            raise TransferFailed("the script announced a result without a valid size and checksum")

        lost: list[str] = []  # why the script's bytes can no longer be read: the upload stops, no retry
        # The channel has one reader at a time. gRPC reads a call's request iterator on a thread of its own,
        # which may still be pulling a piece after its call ended (refused, cut): a retry's reader waits for it,
        # and once the upload is over no reader may start, so the channel is the serving loop's alone again.
        one_reader = threading.Lock()
        over = False

        def read_from(start: int) -> Iterator[bytes]:
            for offset in range(start, size, BULK_UPLOAD_CHUNK_BYTES):
                with one_reader:
                    if over:  # asked by a call that ended: the script has moved on, its channel is not ours
                        return
                    try:
                        data = self._pull(channel, offset, min(BULK_UPLOAD_CHUNK_BYTES, size - offset))
                    except (ChannelClosed, ValueError, TransferFailed) as exc:
                        lost.append(str(exc))
                        raise
                yield data

        started = time.monotonic()
        try:
            upload_id = upload_stream(
                self.agent.bulk,
                self.agent.stub,
                self.agent.current_session,
                read_from,
                size,
                checksum,
                job_id=self.job_id,
                task_id=task.task_id,
                deadline=task.deadline or time.time() + 3600,
                stop=_EitherStop(self.stop_event, lost),
                meter=self.agent.metrics.transfers,
            )
        except TransferFailed:
            if lost:
                raise TransferFailed(f"the script's result could not be read: {lost[0]}") from None
            raise
        finally:
            with one_reader:  # waits for a piece an ended call's reader is still pulling
                over = True
        self._log_transfer("result uploaded", size, started, task)
        return upload_id

    def _pull(self, channel: LineChannel, offset: int, size: int) -> bytes:
        """``size`` bytes of the script's result from ``offset``; its other requests meanwhile are served."""
        channel.send({"op": "pull", "offset": offset, "size": size})
        while True:
            reply = channel.recv()
            if reply["op"] != "data":
                self._answer(channel, reply)  # e.g. metrics a thread of the script logged
                continue
            if (reply.get("offset"), reply.get("size")) != (offset, size):
                got = f"{reply.get('offset')}+{reply.get('size')}"
                raise TransferFailed(f"the script sent bytes {got}, not the {offset}+{size} asked for")
            return channel.recv_bytes(size)

    def _release_gate(self) -> None:
        if self._gate_held and self.agent.task_gate is not None:
            self._gate_held = False
            self.agent.task_gate.release()

    def _deliver(self, message: dict[str, Any], channel: LineChannel) -> tuple[bool, str]:
        task = self.current
        if task is None or message.get("task_id") != task.task_id:
            return False, "no current task for this result"
        model_path = self.exchange / f"task-{task.task_id}.safetensors"
        result_path = Path(message["path"]) if message.get("path") else None
        self._report()  # the round's output lines reach the server before its result
        try:
            upload_id = ""
            if isinstance(message.get("stream"), dict):
                upload_id = self._upload_from_script(task, message, channel)
            elif result_path is not None:
                if result_path.parent.resolve() != self.exchange.resolve():
                    return False, "result file outside the job's exchange folder"
                base = model_path if model_path.is_file() else None
                params_type = message.get("params_type") or "FULL"
                if self._filter(self.result_filters, task, result_path, params_type, base, message.get("meta") or {}):
                    message = {**message, "checksum": None}  # the script's checksum was of the unfiltered file
                started = time.monotonic()
                checksum = message.get("checksum") or file_checksum(str(result_path)).hexdigest()
                upload_id = upload_stream(
                    self.agent.bulk,
                    self.agent.stub,
                    self.agent.current_session,
                    file_reader(result_path),
                    result_path.stat().st_size,
                    checksum,
                    job_id=self.job_id,
                    task_id=task.task_id,
                    deadline=task.deadline or time.time() + 3600,
                    stop=self.stop_event,
                    meter=self.agent.metrics.transfers,
                )
                self._log_transfer("result uploaded", result_path.stat().st_size, started, task)
                result_path.unlink(missing_ok=True)  # on the server now: free its memory before the next task's
            reply = self.agent.call(
                "SubmitResult",
                pb.SubmitResultRequest(
                    session_id=self.agent.current_session(),
                    job_id=self.job_id,
                    task_id=task.task_id,
                    upload_id=upload_id,
                    meta_json=json.dumps(message.get("meta") or {}),
                    metrics_json=json.dumps(message.get("metrics") or {}),
                    params_type=message.get("params_type") or "FULL",
                ),
            )
            accepted, text = reply.accepted, reply.message
        except grpc.RpcError as exc:  # the relay goes on: the script gets a refusal, the server times the task out
            accepted, text = False, f"could not submit the result: {exc.code().name}: {exc.details()}"
        except TransferFailed as exc:
            accepted, text = False, str(exc)
            self._submit_error(task, f"result upload failed: {exc}")  # so the server need not wait it out
        except FilterError as exc:
            accepted, text = False, f"result refused on this site: {exc}"
            self._submit_error(task, text)
        finally:
            for path in (result_path, model_path):
                if path is not None:
                    path.unlink(missing_ok=True)
            if self.launch_once:  # per task, the gate is held until the script has exited
                self._release_gate()
        extra = _tag(task)
        if accepted:
            self.log.info("%s result delivered", task.name, extra=extra)
        else:
            self.log.warning("%s result not accepted: %s", task.name, text, extra=extra)
        self.current = None
        return accepted, text

    def _filter(
        self,
        chain: FilterChain,
        task: pb.Task,
        path: Path,
        params_type: str,
        base: Path | None,
        meta: dict[str, Any],
    ) -> bool:
        """Run ``chain``'s filters for ``task`` over ``path`` in place; whether any changed it (FilterError)."""
        if not chain.for_task(task.name):
            return False
        kind = chain.key.removesuffix("_filters")
        context = FilterContext(self.agent.name, task.name, kind, params_type, base, meta)
        filtered = chain.apply(path, context)
        replace_file(filtered, path)
        if filtered != path:
            self.log.info("%s: %s applied", task.name, chain.key, extra=_tag(task))
        return filtered != path

    def _log_transfer(self, what: str, size: int, started: float, task: pb.Task) -> None:
        """Large transfers get a line with their size and rate (small ones would be noise)."""
        if size >= 64 * 1024 * 1024:
            seconds = max(time.monotonic() - started, 1e-6)
            self.log.info(
                "%s: %.1f MiB in %.2f s (%.0f MB/s)",
                what,
                size / 2**20,
                seconds,
                size / seconds / 1e6,
                extra=_tag(task),
            )

    def _submit_error(self, task: pb.Task, error: str) -> None:
        try:
            self.agent.call(
                "SubmitResult",
                pb.SubmitResultRequest(
                    session_id=self.agent.current_session(), job_id=self.job_id, task_id=task.task_id, error=error
                ),
            )
        except Exception as exc:  # the server will time the task out
            self.log.warning("could not report the error to the server: %s", exc)

    def _queue_metrics(self, records: list[dict[str, Any]]) -> None:
        if not self.forward_metrics:
            return
        with self._outbox_lock:
            for r in records[:1000]:
                if r.get("value") is None:
                    continue
                self._outbox_metrics.append(
                    pb.MetricRecord(
                        tag=str(r.get("tag", ""))[:256],
                        value=float(r["value"]),
                        step=int(r.get("step") or 0),
                        wall_time=float(r.get("wall_time") or time.time()),
                        group_member=str(r.get("group_member") or "")[:256],
                        kind=str(r.get("kind") or "")[:16],
                        text=str(r.get("text") or "")[:MAX_RECORD_TEXT],
                    )
                )
        self._outbox_ready.set()

    # ------------------------------------------------------------------ reporting
    def _report(self, *, job_state: str = "", message: str = "") -> None:
        with self._outbox_lock:
            lines, self._outbox_lines = self._outbox_lines, []
            metrics, self._outbox_metrics = self._outbox_metrics, []
        if not (lines or metrics or job_state):
            return
        try:
            self.agent.call(
                "Report",
                pb.ReportRequest(
                    session_id=self.agent.current_session(),
                    job_id=self.job_id,
                    logs=lines,
                    metrics=metrics,
                    job_state=job_state,
                    message=message,
                ),
            )
        except Exception as exc:
            if job_state:
                self.log.warning("could not report job state %r to the server: %s", job_state, exc)

    def _flush_loop(self) -> None:
        """Send the outbox when something is in it, gathering what comes within REPORT_INTERVAL_S into
        one Report; an idle job's reporter sleeps (a thousand simulated sites' reporters woken twice a
        second each kept two cores busy)."""
        while True:
            self._outbox_ready.wait()
            if self.done.is_set():
                break
            self.done.wait(REPORT_INTERVAL_S)
            self._outbox_ready.clear()
            self._report()
        self._report()

    def _fail(self, message: str) -> None:
        if self._failed_reported:
            return
        self._failed_reported = True
        self.log.error("job failed on this site: %s", message)
        self._report(job_state="failed", message=message)

    # ------------------------------------------------------------------ ending
    def _reap_after_end(self) -> None:
        deadline = time.monotonic() + END_GRACE_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return
            if self.process is None and self.done.is_set():
                return
            time.sleep(0.2)
        if self.process is not None and self.process.poll() is None:
            self.log.warning("training script still running %.0f s after the job ended; stopping it", END_GRACE_S)
            self._kill_script()

    def _end_group_when_script_exits(self) -> None:
        """Wait until the script exits, then kill what is left of its process group (processes it started).

        The script is waited for without being reaped, so that its pid, the group's id, is not reused meanwhile.
        """
        assert self.process is not None
        wait_unreaped(self.process)

    def _kill_script(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        stop_group(process)  # the script, and what it started


def _shown(command: list[str]) -> str:
    """``command`` for the log, fl's exec wrappers (``python -I -S -c CODE ...``) shortened to ``-c ...``."""
    return shlex.join("..." if "\n" in arg else arg for arg in command)


def _tag(task: pb.Task) -> dict[str, Any]:
    """The log ``extra`` of lines about ``task``: its round index and the job's rounds (fl.rounds)."""
    return dict(log_round(task.round, task.num_rounds))
