"""Where a recipe runs: ``SimEnv`` (fl's simulator), ``PocEnv`` (local TLS daemons), ``ProdEnv`` (a federation).

``recipe.execute(env)`` returns a :class:`Run`: ``get_status()``, ``get_result()`` (the result folder,
waiting for the job to end) and ``wait()``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl.job.fed_job import FedJob, JobConfigError
from fl.process import popen_bound_to_parent
from fl.pythonpath import module_command

if TYPE_CHECKING:
    from fl.admin import AdminClient

__all__ = ["PocEnv", "ProdEnv", "Run", "SimEnv"]

TERMINAL = ("finished", "failed", "aborted")
#: Seconds a POC daemon has to start listening or registering before the run gives up.
POC_START_TIMEOUT_S = 120.0


class Run:
    """One execution of a recipe's job: its status and, once it ended, its result folder."""

    def __init__(self, job_id: str, *, status: str | None = None, result: Path | None = None) -> None:
        self.job_id = job_id
        self._status = status
        self._result = result

    def get_job_id(self) -> str:
        return self.job_id

    def get_status(self) -> str | None:
        """The job's status: ``finished``, ``failed``, ``aborted``, or a state on the way there."""
        return self._status

    def wait(self, timeout: float | None = None) -> str | None:
        """Wait until the job ended (or ``timeout`` s); returns its status."""
        return self._status

    def get_result(self, timeout: float | None = None) -> Path | None:
        """The folder with the job's results (checkpoints, validation, logs), once the job ended."""
        self.wait(timeout)
        return self._result


class SimEnv:
    """fl's simulator on this machine: the real server and ``num_clients`` sites over loopback."""

    def __init__(
        self,
        *,
        num_clients: int = 0,
        clients: list[str] | None = None,
        num_threads: int | None = None,
        gpu_config: str | None = None,
        log_config: str | None = None,
        workspace_root: str | os.PathLike[str] = "/tmp/fl/simulation",
        timeout: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if num_clients < 0 or (num_clients == 0 and not clients):
            raise JobConfigError("SimEnv: give num_clients (at least 1) or clients")
        if clients and num_clients and len(clients) != num_clients:
            raise JobConfigError(f"SimEnv: num_clients={num_clients} but {len(clients)} clients named")
        self.num_clients = num_clients or len(clients or [])
        self.clients = clients
        self.num_threads = num_threads
        self.gpu_config = gpu_config
        self.workspace_root = Path(os.environ.get("FL_SIMULATOR_WORKSPACE_ROOT") or workspace_root)
        self.timeout = timeout
        self.log_config = log_config
        self.extra = dict(extra or {})
        _log_level(log_config)  # a bad value is refused here, before anything runs

    def deploy(self, job: FedJob) -> Run:
        """Simulate ``job`` in ``workspace_root/<job name>``; returns when it ended."""
        workspace = (self.workspace_root / job.name).resolve()
        _apply_log_config(self.log_config)
        code = job.simulator_run(
            workspace,
            n_clients=None if self.clients else self.num_clients,
            clients=self.clients or (job.sites or None),
            threads=self.num_threads,
            gpu=self.gpu_config,
            timeout=self.timeout,
        )
        latest = workspace / "latest"
        result = latest.resolve() if latest.exists() else None
        status = _read_status(result) if result else None
        return Run(
            result.name if result else job.name, status=status or ("finished" if code == 0 else "failed"), result=result
        )


#: FLARE's log modes and the level fl logs at for each (fl's format is one; "verbose" adds debug).
LOG_MODES = {"concise": "INFO", "full": "INFO", "verbose": "DEBUG"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(log_config: str | None) -> str | None:
    """The level FLARE's ``log_config`` names (a mode or a level), None for none or a JSON config file."""
    if log_config is None or log_config.endswith(".json"):
        return None
    level = LOG_MODES.get(log_config.lower(), log_config.upper())
    if level not in LOG_LEVELS:
        raise JobConfigError(
            f"SimEnv: log_config {log_config!r} is not one of {', '.join(LOG_MODES)}, a level "
            f"({', '.join(x.lower() for x in LOG_LEVELS)}) or a .json logging config file"
        )
    return level


def _apply_log_config(log_config: str | None) -> None:
    """Configure this process's logging as FLARE's ``log_config`` says (a JSON file is a dictConfig)."""
    import json
    import logging.config

    from fl.log import setup_logging

    if log_config is not None and log_config.endswith(".json"):
        try:
            logging.config.dictConfig(json.loads(Path(log_config).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise JobConfigError(f"SimEnv: log_config {log_config}: {exc}") from None
    elif (level := _log_level(log_config)) is not None:
        setup_logging(level=level)


def _read_status(run_dir: Path) -> str | None:
    import json

    try:
        status = json.loads((run_dir / "status.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


class _AdminRun(Run):
    """A job on a server reached by an admin client; ``on_end`` runs once it ended (POC: stop the daemons)."""

    def __init__(self, client_factory: Any, job_id: str, results: Path, on_end: Any = None) -> None:
        super().__init__(job_id, status="submitted")
        self._client_factory = client_factory
        self._results = results
        self._on_end = on_end

    def get_status(self) -> str | None:
        if self._status not in TERMINAL:
            with self._client_factory() as client:
                self._status = client.job(self.job_id).status
        return self._status

    def wait(self, timeout: float | None = None) -> str | None:
        if self._status not in TERMINAL:
            with self._client_factory() as client:
                self._status = client.wait(self.job_id, timeout).status
                if self._status in TERMINAL and self._result is None:
                    client.download(self.job_id, self._results / self.job_id)
                    self._result = self._results / self.job_id
            if self._status in TERMINAL and self._on_end is not None:
                self._on_end()
                self._on_end = None
        return self._status


def _submit(client: AdminClient, job: FedJob) -> str:
    with tempfile.TemporaryDirectory(prefix="fl-recipe-") as tmp:
        return str(client.submit(job.export_job(tmp)).job_id)


class ProdEnv:
    """A running federation: submit with an admin's TLS folder (``fl provision``'s admin folder)."""

    def __init__(
        self,
        *,
        startup_kit: str | os.PathLike[str] | None = None,
        startup_kit_location: str | os.PathLike[str] | None = None,
        server: str | None = None,
        server_name: str | None = None,
        results_dir: str | os.PathLike[str] = "/tmp/fl/results",
    ) -> None:
        kit = startup_kit or startup_kit_location
        if kit is None:
            raise JobConfigError("ProdEnv: give startup_kit= (an admin's TLS folder from `fl provision`)")
        self.startup_kit = Path(kit)
        self.server = server or os.environ.get("FL_SERVER")
        if not self.server:
            raise JobConfigError("ProdEnv: give server='HOST:PORT' (or set FL_SERVER)")
        self.server_name = server_name
        self.results_dir = Path(results_dir)

    def _client(self) -> AdminClient:
        from fl.admin import AdminClient
        from fl.transport import TLSConfig

        return AdminClient(str(self.server), tls=TLSConfig.load(self.startup_kit), server_name=self.server_name)

    def deploy(self, job: FedJob) -> Run:
        """Submit ``job``; the run waits for it on ``get_result()`` / ``wait()``."""
        with self._client() as client:
            job_id = _submit(client, job)
        return _AdminRun(self._client, job_id, self.results_dir)


class PocEnv:
    """A proof of concept on this machine: TLS provisioned in ``workspace``, ``fl server`` and one ``fl site``
    per client as separate daemons on 127.0.0.1.

    They end when the run ends (``get_result``/``wait`` saw the job end, or :meth:`stop`), and
    with this process however it ends (:func:`fl.process.popen_bound_to_parent`, SIGTERM).
    """

    def __init__(
        self,
        *,
        num_clients: int | None = 2,
        clients: list[str] | None = None,
        workspace: str | os.PathLike[str] = "/tmp/fl/poc",
        start_timeout: float = POC_START_TIMEOUT_S,
    ) -> None:
        self.clients = list(clients) if clients else [f"site-{i + 1}" for i in range(num_clients or 0)]
        if not self.clients:
            raise JobConfigError("PocEnv: give num_clients (at least 1) or clients")
        self.workspace = Path(workspace).resolve()
        self.start_timeout = start_timeout
        self.address = ""
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def tls(self) -> Path:
        return self.workspace / "tls"

    @property
    def pids(self) -> list[int]:
        """The daemons' process ids: the server first, then one per site."""
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Provision TLS (kept across runs) and start the server and site daemons; idempotent."""
        if self._procs:
            return
        from fl.provision import provision

        provision(self.tls, server_name="server", sites=self.clients, admins=["admin"])
        try:
            self._start_daemons(self.tls)
        except BaseException:
            self.stop()
            raise

    def deploy(self, job: FedJob) -> Run:
        """Start the daemons and submit ``job``; the run stops the daemons once the job ended."""
        self.start()
        try:
            with self._client(self.tls) as client:
                job_id = _submit(client, job)
        except BaseException:
            self.stop()
            raise
        return _AdminRun(lambda: self._client(self.tls), job_id, self.workspace / "results", on_end=self.stop)

    def _client(self, tls: Path) -> AdminClient:
        from fl.admin import AdminClient
        from fl.transport import TLSConfig

        return AdminClient(self.address, tls=TLSConfig.load(tls / "admin"))

    def _start_daemons(self, tls: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        server_log = self._start(
            "server",
            ["server", "--workspace", str(self.workspace / "server"), "--host", "127.0.0.1", "--port", str(port),
             "--tls", str(tls / "server")],
        )  # fmt: skip
        self._wait_log(server_log, "fl server listening", "the POC server to listen")
        for site in self.clients:
            self._start(
                site,
                ["site", "--name", site, "--server", self.address, "--tls", str(tls / site),
                 "--workspace", str(self.workspace / site)],
            )  # fmt: skip

    def _start(self, name: str, args: list[str]) -> Path:
        logs = self.workspace / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = popen_bound_to_parent(
                module_command("fl", *args),
                death_signal=signal.SIGTERM,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        return log_path

    def _wait_log(self, log_path: Path, text: str, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if text in log_path.read_text(errors="replace"):
                return
            if any(p.poll() is not None for p in self._procs):
                raise RuntimeError(f"PocEnv: a daemon exited while waiting for {what}; see {self.workspace / 'logs'}")
            time.sleep(0.2)
        raise TimeoutError(f"PocEnv: waited {self.start_timeout:.0f} s for {what}; see {log_path}")

    def stop(self) -> None:
        """Stop the daemons this environment started (their process groups, by PID), sites first."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group a daemon leads (it and the training scripts it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
