"""A reused script process: one forked child of the fork server runs many per-task script runs in turn.

Forking a process that has imported torch costs what its exit and its first writes cost: the page
tables of ~0.7 GiB, and a copy of every page the script touches (Python's reference counts write to
every object it uses). Measured here per task (hello-pt's CNN, 16 samples): ~40 ms to fork, ~45 ms
for the exit, and the script's own imports three to five times slower than in a process that ran
them once. A worker (:func:`serve`) pays that once, then takes run after run from the server: each
comes with its own stdout and channel descriptors, argv, environment and working directory.

Between runs the worker puts back what the script may have changed, so that a run sees what a fresh
fork would (:class:`Baseline`): the job's own modules are imported afresh (every module that is not
the standard library's, an installed package's or fl's), and the environment, working directory,
``sys.path``, ``sys.argv``, standard streams, signal handlers, logging, warnings filters and the
random generators (Python's, NumPy's, torch's) are restored. A run that leaves anything it cannot
put back (a thread or a child process still running, a descriptor still open, memory grown by more
than :data:`MAX_GROWTH_BYTES`), or that failed, retires the worker: the server forks a fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Callable
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import CodeType
from typing import Any

__all__ = ["MAX_GROWTH_BYTES", "MAX_RUNS", "Baseline", "serve"]

#: Runs one worker serves before it retires (a slow leak in a library cannot grow without end).
MAX_RUNS = 500
#: Resident memory a worker may gain over its first run's before it retires.
MAX_GROWTH_BYTES = 512 * 1024**2
#: Seconds a run's own threads get to finish after the script returned.
THREAD_GRACE_S = 0.5
#: The descriptor the worker keeps its connection to the server on (0-2 are the run's streams, 3 its channel).
WORKER_FD = 4
CHANNEL_FD = 3
MAX_MESSAGE_BYTES = 1 << 20
#: Compiled module sources a worker keeps (:func:`install_code_cache`).
CODE_CACHE_ENTRIES = 1024


def _library_roots() -> tuple[str, ...]:
    """Where modules that are not the job's live: the standard library, installed packages, fl itself."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(str(Path(__file__).resolve().parents[1]))  # fl's package (an editable install lives elsewhere)
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


def _module_is_library(module: Any, roots: tuple[str, ...]) -> bool:
    where = getattr(module, "__file__", None)
    paths = [where] if where else list(getattr(module, "__path__", None) or [])
    if not paths:
        return True  # built in or frozen: nothing of the job's
    return all(os.path.realpath(str(p)).startswith(roots) for p in paths)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_fds() -> dict[int, tuple[int, int]]:
    """This process's descriptors above the run's (0-3) and the worker's own (4): ``{fd: (st_dev, st_ino)}``."""
    listing = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = os.listdir(listing)
    finally:
        os.close(listing)
    found: dict[int, tuple[int, int]] = {}
    for fd in (int(name) for name in names):
        if fd > WORKER_FD:
            with contextlib.suppress(OSError):  # the listing's own descriptors, closed by now
                st = os.fstat(fd)
                found[fd] = (st.st_dev, st.st_ino)
    return found


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class Baseline:
    """What a run may change in this process, as it was before the first run; :meth:`restore` puts it back."""

    def __init__(self) -> None:
        self.modules = set(sys.modules)
        self.environ = dict(os.environ)
        self.cwd = os.getcwd()
        self.path = list(sys.path)
        self.argv = list(sys.argv)
        self.streams = (sys.stdout, sys.stderr, sys.stdin)
        self.handlers = {
            s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)
        }
        root = logging.getLogger()
        self.root_handlers, self.root_level = list(root.handlers), root.level
        self.loggers = set(logging.Logger.manager.loggerDict)
        self.warnings = list(warnings.filters)
        self.random = random.getstate()
        self.threads = set(threading.enumerate())
        self.roots = _library_roots()
        # After the first run: what the libraries it imported keep (their memory, files they hold open).
        self.rss: int | None = None
        self.fds: set[int] | None = None
        self._restorers = [r for r in (_numpy_restorer(), _torch_restorer()) if r is not None]

    def restore(self, given: set[tuple[int, int]]) -> str | None:
        """Put back what the last run changed; why this worker must retire instead, if it must.
        ``given``: the run's own descriptors (its output pipe, its channel), which must all be closed now."""
        sys.stdout, sys.stderr, sys.stdin = self.streams
        for stream in self.streams[:2]:
            with contextlib.suppress(Exception):
                stream.flush()
        self._clear_modules()
        os.environ.clear()
        os.environ.update(self.environ)
        os.chdir(self.cwd)
        sys.path[:] = self.path
        sys.argv[:] = self.argv
        for sig, handler in self.handlers.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                if signal.getsignal(sig) is not handler and handler is not None:
                    signal.signal(sig, handler)
        self._restore_logging()
        warnings.filters[:] = self.warnings  # type: ignore[index]
        random.setstate(self.random)
        for restorer in self._restorers:
            restorer()
        gc.collect()
        if self.rss is None:  # after the first run: what its libraries keep is never garbage, collections skip it
            gc.freeze()
        return self._taint(given)

    def _clear_modules(self) -> None:
        for name in [n for n in sys.modules if n not in self.modules]:
            module = sys.modules.get(name)
            if module is not None and not _module_is_library(module, self.roots):
                del sys.modules[name]

    def _restore_logging(self) -> None:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in self.root_handlers]:
            root.removeHandler(handler)
            with contextlib.suppress(Exception):
                handler.close()
        root.handlers[:] = self.root_handlers
        root.setLevel(self.root_level)
        manager = logging.Logger.manager
        for name in [n for n in manager.loggerDict if n not in self.loggers]:
            logger = manager.loggerDict.pop(name)
            for handler in list(getattr(logger, "handlers", [])):
                with contextlib.suppress(Exception):
                    handler.close()
        logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]

    def _taint(self, given: set[tuple[int, int]]) -> str | None:
        deadline = time.monotonic() + THREAD_GRACE_S
        for thread in [t for t in threading.enumerate() if t not in self.threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        if left:
            return f"the run left threads running: {', '.join(left[:5])}"
        try:
            while True:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    return "the run left a child process running"
        except ChildProcessError:
            pass
        try:
            closed = _identity(CHANNEL_FD) != _identity(0)
        except OSError:
            closed = True
        if closed:
            return "an object of the run closed a descriptor after it ended (it may close the next run's)"
        fds = _open_fds()
        if given & set(fds.values()):
            return "the run left its output or its channel open (in a descriptor of its own)"
        if self.fds is None:
            self.fds = set(fds)
        elif set(fds) - self.fds:
            return f"the run left {len(set(fds) - self.fds)} descriptor(s) open"
        rss = _rss_bytes()
        if self.rss is None:
            self.rss = rss
        elif rss > self.rss + MAX_GROWTH_BYTES:
            return f"resident memory grew by {(rss - self.rss) >> 20} MiB over its first run's"
        return None


def _numpy_restorer() -> Callable[[], None] | None:
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    state = numpy.random.get_state()
    return lambda: numpy.random.set_state(state)


def _torch_restorer() -> Callable[[], None] | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    rng, threads, grad, dtype = (
        torch.get_rng_state(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
    )

    def restore() -> None:
        torch.set_rng_state(rng)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)

    return restore


def _with_filename(code: CodeType, filename: str) -> CodeType:
    consts = tuple(_with_filename(c, filename) if isinstance(c, CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def install_code_cache(limit: int = CODE_CACHE_ENTRIES) -> None:
    """Compile each module source once per worker: the job's modules are imported afresh every run
    (and every site's copy of the job has its own path), but the same source gives the same code, so
    it is reused with its file name put right. Where Python writes no ``.pyc`` (PYTHONDONTWRITEBYTECODE,
    a read-only folder), that is most of a re-import's cost."""
    compile_source = SourceFileLoader.source_to_code
    cache: dict[tuple[bytes, int], CodeType] = {}

    def source_to_code(self: Any, data: Any, path: Any, *, _optimize: int = -1) -> CodeType:
        key = (hashlib.blake2b(bytes(data), digest_size=16).digest(), _optimize)
        code = cache.get(key)
        if code is None:
            code = compile_source(self, data, path, _optimize=_optimize)
            if len(cache) >= limit:
                cache.pop(next(iter(cache)))
            cache[key] = code
            return code
        return code if code.co_filename == str(path) else _with_filename(code, str(path))

    SourceFileLoader.source_to_code = source_to_code  # type: ignore[method-assign]


def _reset_client_api() -> None:
    """A fresh Client API context for the next run (the last run's channel closed)."""
    client = sys.modules.get("fl.client")
    if client is not None:
        client._new_context()


def serve(
    conn_fd: int, enter_run: Callable[[dict[str, Any], int, int], None], run_script: Callable[[list[str]], int]
) -> None:
    """The worker's loop (in the forked child, once it is a script process): take a run from the server
    on ``conn_fd`` (a JSON request and two descriptors: output, channel), run it, report
    ``{"code": exit code, "retire": reason or null}``; exit when retiring or when the server goes."""
    if conn_fd != WORKER_FD:
        os.dup2(conn_fd, WORKER_FD, inheritable=False)
        os.close(conn_fd)
    os.closerange(WORKER_FD + 1, 1 << 16)
    opened = os.open(os.devnull, os.O_RDWR)
    devnull = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, WORKER_FD + 1)  # above the run's and the worker's
    os.close(opened)
    for fd in range(CHANNEL_FD + 1):  # between runs 0-3 hold /dev/null: a run's descriptors never land there
        os.dup2(devnull, fd)
    conn = socket.socket(fileno=WORKER_FD)
    install_code_cache()
    baseline: Baseline | None = None
    runs = 0
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE_BYTES, 2)
        except OSError:
            os._exit(0)
        if not data or len(fds) != 2:
            os._exit(0)  # the server closed the connection: it retired this worker
        if baseline is None:
            baseline = Baseline()
        request = json.loads(data)
        given = {_identity(fd) for fd in fds}
        enter_run(request, fds[0], fds[1])
        for fd in fds:
            os.close(fd)
        code = run_script([str(a) for a in request["argv"]])
        _reset_client_api()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in range(1, CHANNEL_FD + 1):
            os.dup2(devnull, fd)  # the runner's reader sees the end of the run's output, its channel closes
        retire = baseline.restore(given)
        runs += 1
        if retire is None and code != 0:
            retire = f"the run exited with code {code}"
        if retire is None and runs >= MAX_RUNS:
            retire = f"it served {runs} runs"
        conn.send(json.dumps({"code": code, "retire": retire}).encode())
        if retire is not None:
            os._exit(0)
