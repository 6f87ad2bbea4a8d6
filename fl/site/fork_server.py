"""A warm fork worker: training scripts start by forking a process that has imported torch already.

Starting ``python`` and importing torch costs about 2 s and 0.2 GiB of private memory per script;
a simulator that runs a script per task for hundreds of sites cannot pay that each time. A sites
host therefore starts ONE fork server (:func:`start`, a fresh single-threaded process: forking a
process that runs gRPC threads is unsafe) that imports torch and fl's Client API, then forks one
child per script run; the child takes its environment, working directory, argv and descriptors from
the request and runs the script with ``runpy.run_path(script, run_name="__main__")``. The forked
children share the server's imported pages copy-on-write. A request that names a key (the job's id)
goes, where the server reuses workers (the simulator's default), to a worker that ran runs of the
same key before (:mod:`fl.site.warm_worker`): no fork, exit or copy-on-write faults per run.

The job runner starts no process of its own for such a run (no interpreter, no relay): it connects
to the server's unix socket, hands over the script's stdout (a pipe it reads) and its channel
descriptor (SCM_RIGHTS) with the run's argv, environment and working directory, and gets a
:class:`ForkedScript` back: what it uses of a ``Popen`` (pid, stdout, poll, wait, returncode), its
process group signalled through the server (which alone reaps the script, so it never signals a
reused pid). Measured here (load 1.5, an empty script, median of 20): 43 ms a run, against 84 ms
through the relay interpreter (``python -I -S``, started through fl's death-binding ``exec``) that
used to stand between them.

No orphans: the server gets SIGKILL when its parent dies (:func:`fl.process.popen_bound_to_parent`),
each child gets SIGKILL when the server dies (``PR_SET_PDEATHSIG``, set right after the fork), and a
child whose runner's connection closes (the runner died, or gave the run up) is killed with
its process group at once: the connection is the runner's, so a runner (a sites host) that dies,
even of SIGKILL, takes its scripts with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fl.fsutil import owned_folder
from fl.log import adapter
from fl.memory import training_memory_env
from fl.process import popen_bound_to_parent
from fl.pythonpath import module_command

__all__ = [
    "ForkServer",
    "ForkedScript",
    "SharedForkServer",
    "active_socket",
    "attach",
    "spawn",
    "start",
    "start_or_explain",
]

#: What the server imports before it forks (what a hello-pt-like script needs; the job's own modules
#: are imported by each child, since two jobs may carry modules of the same name).
PRELOAD = ("torch", "torch.nn", "torch.optim", "torch.utils.data", "numpy", "safetensors.torch", "fl.client")
MAX_REQUEST_BYTES = 1 << 20
MAX_REPLY_BYTES = 4096
READY_TIMEOUT_S = 120.0
#: Seconds an idle worker waits for its next run before it is retired (its memory given back).
WORKER_IDLE_S = 30.0
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
#: The signals a runner may send a forked script's process group (through the server).
GROUP_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)

log = adapter("fl.site")
_active: ForkServer | SharedForkServer | None = None
_give_up_lock = threading.Lock()


class ForkServer:
    """Handle of a started fork server (its process and the socket it listens on, once it is ready)."""

    def __init__(self, process: subprocess.Popen[bytes], socket_path: Path, owner_fd: int | None = None) -> None:
        self.process = process
        self.socket_path = socket_path
        self._owner_fd = owner_fd  # the folder's lock (fl.fsutil.owned_folder): a later start sweeps it if we die
        self._ready = threading.Event()
        self._said: bytes = b""
        threading.Thread(target=self._read_ready, name="fl-fork-server-ready", daemon=True).start()

    def _read_ready(self) -> None:
        assert self.process.stdout is not None
        self._said = self.process.stdout.readline()
        if self._said.strip() != b"ready":  # processes that share it (attach) see its folder go, and give up
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)
        self._ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Whether it has imported what it preloads and listens (waiting up to ``timeout`` seconds)."""
        return self._ready.wait(timeout) and self._said.strip() == b"ready" and self.alive()

    def alive(self) -> bool:
        return self.process.poll() is None

    def why_not_ready(self) -> str:
        return f"exit code {self.process.poll()}"

    def stop(self) -> None:
        """Stop the server; its children get SIGKILL through PR_SET_PDEATHSIG."""
        global _active
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        if _active is self:
            _active = None


class SharedForkServer:
    """A fork server another process of the run started and owns (the simulator's, which its sites
    hosts share): ready once its socket takes a connection, given up once its folder is gone (its
    owner stopped it, or it did not get ready) or ``timeout`` passed."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._ready = False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not self._ready:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    self._ready = True
                except OSError:
                    if not self.socket_path.parent.is_dir() or time.monotonic() > deadline:
                        return False
                    time.sleep(0.02)
        return True

    def why_not_ready(self) -> str:
        gone = not self.socket_path.parent.is_dir()
        return "the process that started it stopped it" if gone else "its socket took no connection in time"

    def stop(self) -> None:
        """Stop using it (its owner stops the server)."""
        global _active
        if _active is self:
            _active = None


def attach(socket_path: Path) -> SharedForkServer:
    """Have this process's job runners fork their scripts from the fork server at ``socket_path``,
    which another process of the run started (:func:`start`) and owns."""
    global _active
    _active = SharedForkServer(socket_path)
    return _active


def start(
    *, preload: tuple[str, ...] = PRELOAD, reuse: bool = True, wait: bool = True, timeout: float = READY_TIMEOUT_S
) -> ForkServer:
    """Start this process's fork server; with ``wait``, wait until it has imported ``preload`` and
    listens (RuntimeError if it does not within ``timeout``), else let it get ready while this process
    goes on (:func:`active_socket` waits for it). ``reuse``: runs that name a key (a job's) run on reused
    workers (:mod:`fl.site.warm_worker`), else each run is a fork of its own.

    Call it before this process starts gRPC; :func:`active_socket` then names it to job runners.
    """
    global _active
    # 0700: whoever can connect can run code. Owned (a lock held while this process lives), so that the
    # folder of a sites host killed with SIGKILL is removed by the next start.
    folder, owner_fd = owned_folder(Path(tempfile.gettempdir()), "fl-fork-")
    path = folder / "socket"
    command = module_command("fl.site.fork_server", str(path), ",".join(preload), "reuse" if reuse else "fork")
    # Its children are the scripts: torch's allocator settings are read once, here (fl.memory).
    env = {**os.environ, **training_memory_env(os.environ)}
    process = popen_bound_to_parent(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    server = ForkServer(process, path, owner_fd)
    if wait and not server.wait_ready(timeout):
        server.stop()
        raise RuntimeError(f"the fork server did not start within {timeout:.0f} s (exit code {process.poll()})")
    _active = server
    return server


def start_or_explain(*, reuse: bool = True) -> ForkServer | None:
    """:func:`start` without waiting (the server imports torch while the run's server starts and its
    sites register), or None after one log line saying why scripts will start as processes instead."""
    try:
        return start(reuse=reuse, wait=False)
    except OSError as exc:
        log.warning("no warm fork worker (%s): training scripts start as processes of their own", exc)
        return None


def active_socket() -> Path | None:
    """The socket of this process's fork server once it is ready (waiting for it, if it is getting
    ready), or None if none runs; a server that did not get ready is stopped, said once in the log."""
    global _active
    server = _active
    if server is None:
        return None
    if server.wait_ready():
        return server.socket_path
    with _give_up_lock:
        if _active is server:
            log.warning(
                "the warm fork worker did not get ready (%s): training scripts start as processes of their own",
                server.why_not_ready(),
            )
            server.stop()
    return None


def spawn(
    socket_path: Path,
    argv: Sequence[str],
    *,
    cwd: str | Path,
    env: Mapping[str, str],
    channel_fd: int,
    key: str | None = None,
) -> ForkedScript:
    """Have the fork server at ``socket_path`` run ``argv`` (a script and its arguments) with ``channel_fd``
    as its channel; OSError if it cannot. The script's stdout and stderr come on the handle's ``stdout``.
    ``key`` (a job's id): the run may take a worker that ran runs of the same key before, if the server
    reuses workers; without one it is a fork of its own."""
    read_end, write_end = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request: dict[str, Any] = {"argv": list(argv), "cwd": str(cwd), "env": dict(env)}
    if key is not None:
        request["key"] = key
    try:
        sock.connect(str(socket_path))
        socket.send_fds(sock, [json.dumps(request).encode()], [write_end, channel_fd])
        reply = json.loads(sock.recv(MAX_REPLY_BYTES) or b'{"error": "it closed the connection"}')
    except (OSError, ValueError) as exc:
        sock.close()
        os.close(read_end)
        raise OSError(f"cannot reach the fork server at {socket_path}: {exc}") from exc
    finally:
        os.close(write_end)
    if not isinstance(reply.get("pid"), int):
        sock.close()
        os.close(read_end)
        raise OSError(f"the fork server could not start the script: {reply.get('error', reply)}")
    pid = reply["pid"]
    return ForkedScript(sock, pid, os.fdopen(read_end, "rb"), list(argv))


class ForkedScript:
    """A script the fork server forked for this process, as a job runner sees a process: ``pid``,
    ``stdout``, ``poll``, ``wait`` and ``returncode`` as a ``Popen`` has them (a signal's death reads
    as its negative number), and :meth:`signal_group` for its process group."""

    def __init__(self, conn: socket.socket, pid: int, stdout: IO[bytes], args: list[str]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.args = args
        self.returncode: int | None = None
        self._conn: socket.socket | None = conn
        self._lock = threading.Lock()  # one reader of the connection at a time

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:
                self._receive(0.0)
            finally:
                self._lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            if self._lock.acquire(timeout=-1 if left is None else left):
                try:
                    self._receive(left)
                finally:
                    self._lock.release()
        return self.returncode

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the script's process group (the server does, while the script is unreaped)."""
        conn = self._conn
        if conn is not None and self.returncode is None:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"op": "signal", "signal": int(sig)}).encode())

    def _receive(self, timeout: float | None) -> None:
        """Read the server's status message (within ``timeout``; None: until it comes)."""
        conn = self._conn
        if conn is None:
            return
        conn.settimeout(timeout)
        try:
            data = conn.recv(MAX_REPLY_BYTES)
        except (TimeoutError, BlockingIOError):
            return
        except OSError:
            data = b""
        code = json.loads(data).get("exit_code") if data else None
        # No exit code: the server went away, and the script with it (PR_SET_PDEATHSIG).
        self.returncode = -signal.SIGKILL if not isinstance(code, int) else code
        self._conn = None
        conn.close()


# ---------------------------------------------------------------------- the server process
@dataclass
class _Run:
    """One script run: the pid of its process (a fork of its own or a reused worker) and the runner's
    connection it answers to (None once that closed)."""

    pid: int
    conn: socket.socket | None


@dataclass
class _Worker:
    """A forked process that runs script runs in turn (:mod:`fl.site.warm_worker`): the server's end of
    its connection, the key of the runs it may take (a job's), its current run and since when it idles."""

    pid: int
    sock: socket.socket
    key: str
    run: _Run | None = None
    idle_since: float = 0.0


@dataclass
class _State:
    """The server's bookkeeping: runs by pid and by their runner's connection, workers by their socket."""

    selector: selectors.BaseSelector
    listener: socket.socket
    reuse: bool
    runs: dict[int, _Run]
    by_conn: dict[int, _Run]
    workers: dict[int, _Worker]  # by the fd of the server's end of the worker's connection

    def server_fds(self) -> list[int]:
        return [self.listener.fileno(), *(k.fd for k in self.selector.get_map().values())]


def _serve(path: Path, preload: list[str], reuse: bool) -> None:
    """The server's loop (single-threaded): accept runners, run their scripts (forked, or on a reused
    worker), report their ends."""
    for module in preload:
        with contextlib.suppress(ImportError):  # a site without torch still forks its scripts
            __import__(module)
    _warm_torch()
    gc.collect()
    gc.freeze()  # what is imported is never garbage: no collection in a child walks (and copies) its pages
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(64)
    state = _State(selectors.DefaultSelector(), listener, reuse, {}, {}, {})
    state.selector.register(listener, selectors.EVENT_READ)
    wakeup, woken = socket.socketpair()  # SIGCHLD wakes the loop: an exit is reported at once
    wakeup.setblocking(False)
    woken.setblocking(False)
    signal.set_wakeup_fd(woken.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    state.selector.register(wakeup, selectors.EVENT_READ)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in state.selector.select(timeout=1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is wakeup:
                with contextlib.suppress(BlockingIOError):
                    wakeup.recv(4096)
            elif sock is listener:
                conn, _ = listener.accept()
                if _peer_uid(conn) != os.getuid():
                    conn.close()
                    continue
                state.selector.register(conn, selectors.EVENT_READ)
            elif sock.fileno() in state.workers:
                _worker_message(state, state.workers[sock.fileno()])
            elif sock.fileno() in state.by_conn:
                _runner_message(state, sock)
            else:
                _first_request(state, sock)
        _reap(state)
        _retire_idle(state, time.monotonic() - WORKER_IDLE_S)


def _warm_torch() -> None:
    """One tiny training step, so that what torch imports lazily (an optimizer's first use pulls in
    torch._dynamo, a first forward torch.distributed: seconds) is imported here, not in every child.

    Tensors of two elements: no parallel region runs, so no OpenMP thread pool exists at the fork.
    """
    if "torch" not in sys.modules:
        return
    import torch

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.relu(layer(torch.zeros(1, 2))).sum().backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _first_request(state: _State, conn: socket.socket) -> None:
    """A runner's request: run its script (on an idle worker of its key, else a new one, or forked
    for this run alone), or answer why not."""
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 2)
        request = json.loads(data) if data else None
        if not isinstance(request, dict) or len(fds) != 2:
            raise ValueError("a request is a JSON object with two descriptors (output, channel)")
        if state.reuse and isinstance(request.get("key"), str):
            run = _run_on_worker(state, conn, request, fds)
        else:
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0], fds[1], state.server_fds())
            run = _Run(pid, conn)
        state.runs[run.pid] = run
        state.by_conn[conn.fileno()] = run
        conn.send(json.dumps({"pid": run.pid}).encode())
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"error": str(exc)}).encode())
        state.selector.unregister(conn)
        conn.close()
    finally:
        for fd in fds:
            os.close(fd)


def _run_on_worker(state: _State, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> _Run:
    """Hand the run to an idle worker of the request's key (a job's runs share workers, other jobs' do
    not), forking one when none idles; workers idling for another key are retired meanwhile."""
    key = request["key"]
    for worker in [w for w in state.workers.values() if w.run is None and w.key != key]:
        _retire(state, worker)
    idle = [w for w in state.workers.values() if w.run is None]
    for worker in idle:
        try:
            socket.send_fds(worker.sock, [json.dumps(request).encode()], fds)
        except OSError:  # it died meanwhile: the reaper collects it
            _retire(state, worker)
            continue
        worker.run = _Run(worker.pid, conn)
        return worker.run
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:
            _worker_child(theirs.fileno(), [*state.server_fds(), ours.fileno(), *fds])
        worker = _Worker(pid, ours, key)
        state.workers[ours.fileno()] = worker
        state.selector.register(ours, selectors.EVENT_READ)
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    socket.send_fds(ours, [json.dumps(request).encode()], fds)  # it waits for its first run
    worker.run = _Run(pid, conn)
    return worker.run


def _worker_message(state: _State, worker: _Worker) -> None:
    """A worker's report on its run (its exit code, and whether it retires), or its end."""
    try:
        data = worker.sock.recv(MAX_REPLY_BYTES)
    except OSError:
        data = b""
    if not data:  # it exited (the reaper reports the run it had)
        _forget_worker(state, worker)
        return
    try:
        report = json.loads(data)
        code, retire = int(report["code"]), bool(report.get("retire"))
    except (ValueError, TypeError, KeyError, AttributeError):  # not a report: its run is reported as it dies
        _retire(state, worker)
        return
    run, worker.run, worker.idle_since = worker.run, None, time.monotonic()
    if run is not None:
        state.runs.pop(run.pid, None)
        _report(state, run, code)
    if retire:
        _forget_worker(state, worker)  # it exits by itself; the reaper collects it


def _retire(state: _State, worker: _Worker) -> None:
    """End an idle worker (SIGKILL to its group: it holds nothing of a run)."""
    _signal_group(worker.pid, signal.SIGKILL)
    _forget_worker(state, worker)


def _forget_worker(state: _State, worker: _Worker) -> None:
    if state.workers.pop(worker.sock.fileno(), None) is not None:
        state.selector.unregister(worker.sock)
        worker.sock.close()


def _retire_idle(state: _State, idle_before: float) -> None:
    for worker in [w for w in state.workers.values() if w.run is None and w.idle_since < idle_before]:
        _retire(state, worker)


def _report(state: _State, run: _Run, exit_code: int) -> None:
    """Tell the run's runner how it ended (a Popen-style exit code) and close the connection."""
    if run.conn is None:
        return
    with contextlib.suppress(OSError):
        run.conn.send(json.dumps({"exit_code": exit_code}).encode())
    state.by_conn.pop(run.conn.fileno(), None)
    state.selector.unregister(run.conn)
    run.conn.close()
    run.conn = None


def _runner_message(state: _State, conn: socket.socket) -> None:
    """``signal`` from the runner goes to the script's group; a closed connection kills the script at
    once (a worker with it: it was in the middle of that run)."""
    run = state.by_conn[conn.fileno()]
    try:
        data = conn.recv(4096)
    except OSError:
        data = b""
    if data:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = json.loads(data)
            if message.get("op") == "signal" and message.get("signal") in GROUP_SIGNALS:
                _signal_group(run.pid, int(message["signal"]))
        return
    _signal_group(run.pid, signal.SIGKILL)
    del state.by_conn[conn.fileno()]
    state.selector.unregister(conn)
    conn.close()
    run.conn = None


def _reap(state: _State) -> None:
    """Collect exited processes: end what is left of their process group, tell the runner of the run
    they had how it ended."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        _signal_group(info.si_pid, signal.SIGKILL)  # processes the script started (pid not reaped: no reuse)
        _, status = os.waitpid(info.si_pid, 0)
        for worker in [w for w in state.workers.values() if w.pid == info.si_pid]:
            _forget_worker(state, worker)
        run = state.runs.pop(info.si_pid, None)
        if run is not None:
            _report(state, run, os.waitstatus_to_exitcode(status))


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _child(request: dict[str, Any], out_fd: int, channel_fd: int, server_fds: list[int]) -> None:
    """In a child forked for one run: become the script's process (descriptors, env, cwd, argv) and run it."""
    code = 1
    try:
        _become_child(server_fds)
        _enter_run(request, out_fd, channel_fd)
        os.closerange(4, 1 << 16)
        code = _run_script([str(a) for a in request["argv"]])
    except BaseException:  # never return into the server's loop
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _worker_child(conn_fd: int, server_fds: list[int]) -> None:
    """In a forked worker: become a script process once, then serve runs (fl.site.warm_worker)."""
    from fl.site import warm_worker

    try:
        _become_child(server_fds)
        warm_worker.serve(conn_fd, _enter_run, _run_script)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        os._exit(1)


def _become_child(server_fds: list[int]) -> None:
    """Once per forked process: its own session, death with the server, the signals a script starts
    with, the server's descriptors closed, its standard streams."""
    os.setsid()  # its own process group: what the server kills when its runner goes
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:
        os._exit(137)  # the server died between the fork and the prctl
    signal.set_wakeup_fd(-1)  # the server's wakeup socket is not the script's
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start
    for fd in server_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    if devnull != 0:
        os.close(devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115


def _enter_run(request: dict[str, Any], out_fd: int, channel_fd: int) -> None:
    """Per run: its output on descriptors 1 and 2, its channel on 3, its environment, working
    directory, ``sys.path`` and ``sys.argv``."""
    channel = os.dup(channel_fd)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    if channel != 3:
        os.dup2(channel, 3)
        os.close(channel)
    env = {str(k): str(v) for k, v in dict(request["env"]).items()}
    env["FL_CHANNEL_FD"] = "3"
    os.environ.clear()
    os.environ.update(env)
    os.chdir(str(request["cwd"]))
    script = str(request["argv"][0])
    _name_process(os.path.basename(script))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *paths, *(p for p in sys.path if p not in ("", "."))]
    sys.argv = [str(a) for a in request["argv"]]


def _name_process(name: str) -> None:
    """Name this process after the script it runs (its first 15 bytes: what ``top``, ``ps -o comm``
    and ``pgrep`` show; the command line stays the fork server's)."""
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _run_script(argv: list[str]) -> int:
    """Run the script as ``python script`` would; its exit code (atexit handlers run, as at exit)."""
    import atexit
    import runpy

    atexit._clear()  # the server's own handlers are not the script's
    try:
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code


def _exit_code(value: object) -> int:
    """The process exit code of ``sys.exit(value)``."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the simulator's to handle
    preload = [m for m in argv[1].split(",") if m] if len(argv) > 1 else list(PRELOAD)
    _serve(Path(argv[0]), preload, reuse=len(argv) > 2 and argv[2] == "reuse")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
