"""A warm fork worker: training scripts start by forking a process that has imported torch already.

Starting ``python`` and importing torch costs about 2 s and 0.2 GiB of private memory per script;
a simulator that runs a script per task for hundreds of sites cannot pay that each time. A sites
host therefore starts ONE fork server (:func:`start`, a fresh single-threaded process: forking a
process that runs gRPC threads is unsafe) that imports torch and fl's Client API, then forks one
child per script run; the child takes its environment, working directory, argv and descriptors from
the request and runs the script with ``runpy.run_path(script, run_name="__main__")``. The forked
children share the server's imported pages copy-on-write.

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

__all__ = ["ForkServer", "ForkedScript", "active_socket", "spawn", "start", "start_or_explain"]

#: What the server imports before it forks (what a hello-pt-like script needs; the job's own modules
#: are imported by each child, since two jobs may carry modules of the same name).
PRELOAD = ("torch", "torch.nn", "torch.optim", "torch.utils.data", "numpy", "safetensors.torch", "fl.client")
MAX_REQUEST_BYTES = 1 << 20
MAX_REPLY_BYTES = 4096
READY_TIMEOUT_S = 120.0
PR_SET_PDEATHSIG = 1
#: The signals a runner may send a forked script's process group (through the server).
GROUP_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)

log = adapter("fl.site")
_active: ForkServer | None = None


class ForkServer:
    """Handle of a running fork server (its process and the socket it listens on)."""

    def __init__(self, process: subprocess.Popen[bytes], socket_path: Path, owner_fd: int | None = None) -> None:
        self.process = process
        self.socket_path = socket_path
        self._owner_fd = owner_fd  # the folder's lock (fl.fsutil.owned_folder): a later start sweeps it if we die

    def alive(self) -> bool:
        return self.process.poll() is None

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


def start(*, preload: tuple[str, ...] = PRELOAD, timeout: float = READY_TIMEOUT_S) -> ForkServer:
    """Start this process's fork server and wait until it has imported ``preload`` and listens.

    Call it before this process starts gRPC; :func:`active_socket` then names it to job runners.
    """
    global _active
    # 0700: whoever can connect can run code. Owned (a lock held while this process lives), so that the
    # folder of a sites host killed with SIGKILL is removed by the next start.
    folder, owner_fd = owned_folder(Path(tempfile.gettempdir()), "fl-fork-")
    path = folder / "socket"
    command = module_command("fl.site.fork_server", str(path), ",".join(preload))
    # Its children are the scripts: torch's allocator settings are read once, here (fl.memory).
    env = {**os.environ, **training_memory_env(os.environ)}
    process = popen_bound_to_parent(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert process.stdout is not None
    ready: list[bytes] = []
    reader = threading.Thread(target=lambda: ready.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not ready or ready[0].strip() != b"ready":
        process.kill()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
        os.close(owner_fd)
        raise RuntimeError(f"the fork server did not start within {timeout:.0f} s (exit code {process.poll()})")
    _active = ForkServer(process, path, owner_fd)
    return _active


def start_or_explain() -> ForkServer | None:
    """:func:`start`, or None after one log line saying why scripts will start as processes instead."""
    try:
        return start()
    except (OSError, RuntimeError) as exc:
        log.warning("no warm fork worker (%s): training scripts start as processes of their own", exc)
        return None


def active_socket() -> Path | None:
    """The socket of this process's fork server, if one runs."""
    if _active is None or not _active.alive():
        return None
    return _active.socket_path


def spawn(
    socket_path: Path, argv: Sequence[str], *, cwd: str | Path, env: Mapping[str, str], channel_fd: int
) -> ForkedScript:
    """Have the fork server at ``socket_path`` fork ``argv`` (a script and its arguments) with ``channel_fd``
    as its channel; OSError if it cannot. The script's stdout and stderr come on the handle's ``stdout``."""
    read_end, write_end = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {"argv": list(argv), "cwd": str(cwd), "env": dict(env)}
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
        status = json.loads(data).get("status") if data else None
        # No status: the server went away, and the script with it (PR_SET_PDEATHSIG).
        self.returncode = -signal.SIGKILL if status is None else os.waitstatus_to_exitcode(int(status))
        self._conn = None
        conn.close()


# ---------------------------------------------------------------------- the server process
@dataclass
class _Run:
    """One forked script: its pid and the runner's connection it answers to (None once that closed)."""

    pid: int
    conn: socket.socket | None


def _serve(path: Path, preload: list[str]) -> None:
    """The server's loop (single-threaded): accept runners, fork their scripts, report their exits."""
    for module in preload:
        with contextlib.suppress(ImportError):  # a site without torch still forks its scripts
            __import__(module)
    _warm_torch()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    wakeup, woken = socket.socketpair()  # SIGCHLD wakes the loop: an exit is reported at once
    wakeup.setblocking(False)
    woken.setblocking(False)
    signal.set_wakeup_fd(woken.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector.register(wakeup, selectors.EVENT_READ)
    runs: dict[int, _Run] = {}  # by pid
    by_conn: dict[int, _Run] = {}  # by the connection's fd
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in selector.select(timeout=1.0):
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
                selector.register(conn, selectors.EVENT_READ)
            elif sock.fileno() in by_conn:
                _runner_message(sock, by_conn, selector)
            else:
                _first_request(sock, listener, runs, by_conn, selector)
        _reap(runs, by_conn, selector)


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


def _first_request(
    conn: socket.socket,
    listener: socket.socket,
    runs: dict[int, _Run],
    by_conn: dict[int, _Run],
    selector: selectors.BaseSelector,
) -> None:
    """A runner's request: fork its script, or answer why not."""
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 2)
        request = json.loads(data) if data else None
        if not isinstance(request, dict) or len(fds) != 2:
            raise ValueError("a request is a JSON object with two descriptors (output, channel)")
        pid = os.fork()
        if pid == 0:
            _child(request, fds[0], fds[1], [listener.fileno(), *(k.fd for k in selector.get_map().values())])
        run = _Run(pid, conn)
        runs[pid] = run
        by_conn[conn.fileno()] = run
        conn.send(json.dumps({"pid": pid}).encode())
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"error": str(exc)}).encode())
        selector.unregister(conn)
        conn.close()
    finally:
        for fd in fds:
            os.close(fd)


def _runner_message(conn: socket.socket, by_conn: dict[int, _Run], selector: selectors.BaseSelector) -> None:
    """``signal`` from the runner goes to the script's group; a closed connection kills the script at once."""
    run = by_conn[conn.fileno()]
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
    del by_conn[conn.fileno()]
    selector.unregister(conn)
    conn.close()
    run.conn = None


def _reap(runs: dict[int, _Run], by_conn: dict[int, _Run], selector: selectors.BaseSelector) -> None:
    """Collect exited scripts: end what is left of their process group, tell their runner the status."""
    while runs:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        _signal_group(info.si_pid, signal.SIGKILL)  # processes the script started (pid not reaped: no reuse)
        _, status = os.waitpid(info.si_pid, 0)
        run = runs.pop(info.si_pid, None)
        if run is None or run.conn is None:
            continue
        with contextlib.suppress(OSError):
            run.conn.send(json.dumps({"status": status}).encode())
        by_conn.pop(run.conn.fileno(), None)
        selector.unregister(run.conn)
        run.conn.close()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _child(request: dict[str, Any], out_fd: int, channel_fd: int, server_fds: list[int]) -> None:
    """In the forked child: become the script's process (descriptors, env, cwd, argv) and run it."""
    code = 1
    try:
        _become_script(request, out_fd, channel_fd, server_fds)
        code = _run_script(request["argv"])
    except BaseException:  # never return into the server's loop
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _become_script(request: dict[str, Any], out_fd: int, channel_fd: int, server_fds: list[int]) -> None:
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
    channel = os.dup(channel_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    if channel != 3:
        os.dup2(channel, 3)
    os.closerange(4, 1 << 16)
    env = {str(k): str(v) for k, v in dict(request["env"]).items()}
    env["FL_CHANNEL_FD"] = "3"
    os.environ.clear()
    os.environ.update(env)
    os.chdir(str(request["cwd"]))
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    script = str(request["argv"][0])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *paths, *(p for p in sys.path if p not in ("", "."))]
    sys.argv = [str(a) for a in request["argv"]]


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
    _serve(Path(argv[0]), [m for m in argv[1].split(",") if m] if len(argv) > 1 else list(PRELOAD))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
