"""Child processes that end when their parent ends, however the parent ends.

Every long-running process fl starts (a site's training scripts, the simulator's sites host, the
server's model builder) is started by :func:`popen_bound_to_parent`: the child asks the kernel
(``prctl(PR_SET_PDEATHSIG)``) for a signal, SIGKILL by default, when its parent dies, so even a
SIGKILL or an OOM kill of the parent, which runs no cleanup code, ends it.

- The ``prctl`` runs in a tiny exec wrapper (``python -I -S -c ...`` that then execs the
  command, same pid), not in a ``preexec_fn``: a ``preexec_fn`` makes Python fork instead of
  vfork, which runs gRPC's fork handlers and breaks a running gRPC server in the parent.
- The kernel sends the signal when the *thread* that forked the child ends, not the process; so
  every child is forked by one launcher thread that lives as long as the process.
- A parent that died between the fork and the ``prctl`` is caught by the wrapper comparing
  ``getppid()`` with the parent's pid.

This covers the direct child. A child's own children (a script's DataLoader workers) are not
bound by it: PyTorch's workers watch their parent and exit when it is gone; the process group a
script leads is killed by its site agent when the job ends normally.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["bound_to_launcher", "launcher_command", "popen_bound_to_parent"]

_T = TypeVar("_T")
_BOUND = sys.platform.startswith("linux")  # PR_SET_PDEATHSIG is Linux's; elsewhere children are not bound
# argv: parent pid, signal, command...; PR_SET_PDEATHSIG is 1.
_BIND_AND_EXEC = """\
import ctypes, os, sys
parent, death_signal, command = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
parent = int(os.environ[parent[1:]] if parent.startswith("$") else parent)
if ctypes.CDLL(None, use_errno=True).prctl(1, death_signal, 0, 0, 0) != 0:
    sys.exit("fl: prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != parent:
    os.kill(os.getpid(), death_signal)
os.execvp(command[0], command)
"""
# argv: an environment variable, command...: exec the command with this process's pid (its own) in it.
_EXPORT_PID_AND_EXEC = """\
import os, sys
os.environ[sys.argv[1]] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class _Launcher:
    """One thread, alive as long as the process, that every bound child is forked from."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """No thread yet (a forked child has none, and must not share its parent's queue or lock)."""
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, start: Callable[[], _T]) -> _T:
        """Run ``start`` on the launcher thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return start()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="fl-launcher", daemon=True)
                self._thread.start()
        future: Future[_T] = Future()
        self._requests.put((start, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            start, future = self._requests.get()
            try:
                future.set_result(start())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


_LAUNCHER = _Launcher()
os.register_at_fork(after_in_child=_LAUNCHER.reset)


def _resolve(program: str, env: Mapping[str, str] | None) -> str:
    """A bare ``program`` name as exec would find it on PATH; FileNotFoundError (as Popen raises) if none.

    A path (with a ``/``) is left as it is: it is relative to the child's cwd, as exec sees it.
    """
    if os.sep in program:
        return program
    found = shutil.which(program, path=(env if env is not None else os.environ).get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", program)
    return found


def _bound_command(
    args: Sequence[str], env: Mapping[str, str] | None = None, death_signal: int = signal.SIGKILL
) -> list[str]:
    """``args`` wrapped so that the process gets ``death_signal`` when this process dies."""
    command = [_resolve(args[0], env), *args[1:]]
    if not _BOUND:
        return command
    return [sys.executable, "-I", "-S", "-c", _BIND_AND_EXEC, str(os.getpid()), str(int(death_signal)), *command]


def launcher_command(args: Sequence[str], pid_variable: str) -> list[str]:
    """argv of a launcher (torchrun) that runs as ``args`` with its own pid in env ``pid_variable`` (same pid).

    What :func:`bound_to_launcher` needs: the children it starts know which parent to be bound to.
    """
    return [sys.executable, "-I", "-S", "-c", _EXPORT_PID_AND_EXEC, pid_variable, *args]


def bound_to_launcher(args: Sequence[str], pid_variable: str, death_signal: int = signal.SIGKILL) -> list[str]:
    """argv that a launcher started by :func:`launcher_command` runs: ends (``death_signal``) when the launcher ends.

    For processes fl does not fork itself (torchrun's ranks, which it starts in sessions of their own,
    out of reach of the script's process-group kill): the kernel ends them with their launcher.
    """
    if not _BOUND:
        return list(args)
    return [sys.executable, "-I", "-S", "-c", _BIND_AND_EXEC, f"${pid_variable}", str(int(death_signal)), *args]


def popen_bound_to_parent(
    args: Sequence[str], *, death_signal: int = signal.SIGKILL, **popen_kwargs: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(args, **popen_kwargs)`` whose child gets ``death_signal`` when this process dies."""
    if "preexec_fn" in popen_kwargs:
        raise ValueError("popen_bound_to_parent cannot take a preexec_fn (it would make Python fork, not vfork)")
    command = _bound_command(args, popen_kwargs.get("env"), death_signal)

    def start() -> subprocess.Popen[bytes]:
        process: subprocess.Popen[bytes] = subprocess.Popen(command, **popen_kwargs)
        return process

    return _LAUNCHER.call(start)
