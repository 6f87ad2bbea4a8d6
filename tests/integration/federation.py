"""A federation of real processes on loopback: `fl server`, `fl site` daemons and admin commands.

Every process this harness starts (and every training script they start) is recorded by PID and
ended at teardown; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from fl.provision import provision

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def export_hello_pt(out: Path) -> Path:
    """jobs/hello-pt exported into ``out`` with a small synthetic dataset; returns the job folder."""
    subprocess.run(
        [sys.executable, str(REPO / "jobs/hello-pt/job.py"), "--export-dir", str(out), "--dataset", "synthetic",
         "--train-size", "64", "--test-size", "64"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out / "hello-pt"


class Daemon:
    """One `python -m fl ...` process with its output in a log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.prefix = prefix or []  # e.g. nsenter: run in another namespace (exec'd, same pid)
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.known_pids: set[int] = set()

    def start(self) -> Daemon:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env or {})
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "fl", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.known_pids.add(self.proc.pid)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        return wait_for(lambda: re.search(pattern, self.log()), timeout, f"{pattern!r} in {self.name}'s log")

    def remember_children(self) -> None:
        """Record the PIDs of the processes this daemon started (training scripts)."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            self.known_pids.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))

    def kill9(self) -> None:
        assert self.proc is not None
        self.remember_children()
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.remember_children()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.known_pids:  # scripts orphaned by a kill -9 of their daemon
            try:
                process = psutil.Process(pid)
                if process.is_running():
                    process.kill()
            except psutil.NoSuchProcess:
                pass


def start_simulation(folder: Path, workspace: Path, log_dir: Path, *args: str) -> Daemon:
    """``fl simulate FOLDER -w WORKSPACE ARGS...`` in the background, in a session of its own (so a
    SIGINT reaches it alone), its output in ``log_dir/simulate.log``; stop it with ``stop()``."""
    return Daemon("simulate", ["simulate", str(folder), "-w", str(workspace), *args], log_dir).start()


class Federation:
    """Provisioned TLS material, a server, sites and admin commands, all on 127.0.0.1."""

    def __init__(self, root: Path, sites: list[str], *, heartbeat_timeout: float = 6.0) -> None:
        self.root = root
        self.tls = root / "tls"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        provision(self.tls, server_name="server", sites=sites, admins=["admin"])
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.heartbeat_timeout = heartbeat_timeout
        self.daemons: list[Daemon] = []
        self.server: Daemon | None = None

    def start_server(self, *extra: str, prefix: list[str] | None = None) -> Daemon:
        args = [
            "server", "--workspace", str(self.root / "server"), "--host", "127.0.0.1", "--port", str(self.port),
            "--tls", str(self.tls / "server"), "--heartbeat-interval", "1",
            "--heartbeat-timeout", str(self.heartbeat_timeout), "--site-wait-timeout", "60", *extra,
        ]  # fmt: skip
        self.server = Daemon(f"server-{len(self.daemons)}", args, self.logs, prefix=prefix).start()
        self.daemons.append(self.server)
        self.server.wait_for_log("fl server listening", 60)
        return self.server

    def start_site(
        self, name: str, *, tls: Path | None = None, extra: tuple[str, ...] = (), address: str | None = None
    ) -> Daemon:
        args = [
            "site", "--name", name, "--server", address or self.address, "--tls", str(tls or self.tls / name),
            "--workspace", str(self.root / name), *extra,
        ]  # fmt: skip
        daemon = Daemon(f"{name}-{len(self.daemons)}", args, self.logs).start()
        self.daemons.append(daemon)
        return daemon

    def fl(self, *args: str, tls: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """An admin command; returns the finished process."""
        command = [sys.executable, "-m", "fl", *args, "--server", self.address, "--tls", str(tls or self.tls / "admin")]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def fl_json(self, *args: str) -> Any:
        proc = self.fl(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def wait_sites(self, names: list[str], timeout: float = 60) -> None:
        def connected() -> bool:
            sites = {s["name"]: s for s in self.fl_json("sites")}
            return all(sites.get(n, {}).get("connected") for n in names)

        wait_for(connected, timeout, f"sites {', '.join(names)} to connect")

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.fl_json("status", job_id)
        return result

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


class FlakyProxy:
    """A TCP proxy on loopback that, once armed, cuts every connection after N more bytes upstream.

    Sites connect through it to the server; cutting mid-upload exercises resumable transfers.
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.cut_after: int | None = None
        self.upstream = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after_bytes: int) -> None:
        with self._lock:
            self.upstream = 0
            self.cut_after = after_bytes

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream:
                    with self._lock:
                        self.upstream += len(data)
                        cut = self.cut_after is not None and self.upstream > self.cut_after
                        if cut:
                            self.cut_after = None
                            self.cuts += 1
                    if cut:
                        self._cut_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self._cut_all()
