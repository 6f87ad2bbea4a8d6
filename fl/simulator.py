"""The simulator: a real fl server and one site agent per site, on loopback, running one job.

It is the production code path (gRPC, chunked safetensors, a process per training script), not a
second implementation; only TLS is off, which is allowed on loopback alone. On a terminal it shows
progress; it ends with a summary of the results and where they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fl.fsutil import read_json
from fl.log import adapter, setup_logging
from fl.process import popen_bound_to_parent
from fl.server.app import FLServer
from fl.server.jobs import TERMINAL, JobRecord
from fl.server.jobstore import JobError, read_job
from fl.site.agent import SiteAgent

__all__ = ["simulate"]

log = adapter("fl.simulator")
MARKER = ".fl-simulation"


def _site_names(job_dir: Path, n_clients: int | None, clients: list[str] | None) -> list[str]:
    spec = read_job(job_dir)
    if clients:
        names = list(clients)
    elif spec.named_sites:
        names = spec.named_sites if n_clients is None else spec.named_sites[:n_clients]
        if n_clients is not None and n_clients > len(spec.named_sites):
            if spec.all_sites_app is None:
                defined = f"{len(spec.named_sites)} sites ({', '.join(spec.named_sites)})"
                raise JobError(f"the job defines {defined}; -n {n_clients} is more")
            names += [f"site-{i}" for i in range(1, n_clients + 1) if f"site-{i}" not in names][
                : n_clients - len(names)
            ]
    else:
        names = [f"site-{i}" for i in range(1, (n_clients or max(spec.min_clients, 2)) + 1)]
    missing = [s for s in names if spec.app_for(s) is None]
    if missing:
        raise JobError(f"the job has no app for {', '.join(missing)}")
    if len(names) < spec.min_clients:
        raise JobError(f"the job needs at least {spec.min_clients} sites; simulating {len(names)}")
    return names


def _prepare_workspace(workspace: Path, sites: list[str]) -> None:
    """Start from a clean simulation workspace, refusing to wipe a folder that isn't one."""
    if workspace.exists() and any(workspace.iterdir()):
        if not (workspace / MARKER).exists() and (workspace / "server").exists():
            raise JobError(f"{workspace} holds a server workspace that is not a simulation's; use another -w")
        for child in workspace.iterdir():
            if child.is_dir() and (child.name == "server" or (child / "site-status.json").exists()):
                shutil.rmtree(child)
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text("fl simulator workspace\n")


class _Progress:
    """Round and sites-done display: a rich status line on a terminal, nothing extra otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._live: Any = None
        self._text = ""

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", text="starting")
            self._live = Live(self._spinner, console=Console(stderr=True), refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def update(self, record: JobRecord) -> None:
        s = record.summary
        if record.status == "running":
            rnd = min(record.round + 1, record.num_rounds) if record.num_rounds else record.round + 1
            text = f"{record.name}: round {rnd}/{record.num_rounds or '?'}"
            if s.get("sites_total"):
                text += f" · {s.get('sites_done', 0)}/{s['sites_total']} sites done"
            if s.get("phase") and s.get("phase") != "training":
                text += f" · {s['phase']}"
        else:
            text = f"{record.name}: {record.status} {record.message}".strip()
        if self._live is not None and text != self._text:
            self._spinner.update(text=text)
        self._text = text

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)


def _summary(record: JobRecord, run_dir: Path, elapsed: float) -> str:
    lines = [
        f"{record.name} {record.status} in {elapsed:.1f} s"
        + (f": {record.num_rounds} rounds on {', '.join(record.sites)}" if record.sites else "")
    ]
    if record.message:
        lines.append(f"  {record.message}")
    validation = read_json(run_dir / "validation.json") or {}
    models = validation.get("models", [])
    best = read_json(run_dir / "best_model.json")
    if models:
        keys = sorted({k for m in models for k in m.get("aggregate", {})})
        key = best["key_metric"] if best else (keys[0] if keys else None)
        if key:
            history = ", ".join(
                f"{'initial' if m['model_version'] == 0 else 'after round ' + str(m['model_version'])} "
                f"{m['aggregate'][key]:.4f}"
                for m in models
                if key in m.get("aggregate", {})
            )
            lines.append(f"  {key}: {history}")
            final = [m for m in models if key in m.get("aggregate", {})][-1]
            lines.append(f"  final {key}: {final['aggregate'][key]:.4f}")
        if best:
            which = (
                "initial model" if best["model_version"] == 0 else f"global model after round {best['model_version']}"
            )
            lines.append(f"  best {best['key_metric']}: {best['score']:.4f} ({which})")
    for label, rel in (
        ("global model", "FL_global_model.pt"),
        ("best model", "best_FL_global_model.pt"),
        ("validation JSON", "validation.json"),
    ):
        path = run_dir / rel
        if path.exists():
            lines.append(f"  {label + ':':<17}{path}")
    tb = run_dir / "tb_events"
    if tb.exists():
        lines.append(f"  {'TensorBoard:':<17}tensorboard --logdir {tb}")
    lines.append(f"  {'logs:':<17}{run_dir / 'logs'}")
    return "\n".join(lines)


def simulate(
    job_dir: str | os.PathLike[str],
    workspace: str | os.PathLike[str],
    *,
    n_clients: int | None = None,
    threads: int | None = None,
    clients: list[str] | None = None,
    gpu: str | None = None,
    timeout: float | None = None,
    progress: bool | None = None,
) -> int:
    """Run an exported job; returns 0 when it finished, 1 when it failed, 130 on Ctrl-C."""
    if not logging_configured():
        setup_logging()
    job_dir = Path(job_dir).resolve()
    workspace = Path(workspace).resolve()
    try:
        sites = _site_names(job_dir, n_clients, clients)
        _prepare_workspace(workspace, sites)
    except JobError as exc:
        log.error("%s", exc)
        return 2
    concurrent = min(threads or len(sites), len(sites))
    per_site = max(1, (os.cpu_count() or 1) // concurrent)
    gpus = [g.strip() for g in gpu.split(",")] if gpu else []

    def site_env(site: str, n: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(per_site), "MKL_NUM_THREADS": str(per_site), "FL_TORCH_THREADS": str(per_site)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[sites.index(site) % len(gpus)] if site in sites else gpus[0]
        return env

    started = time.monotonic()
    server = FLServer(
        workspace / "server",
        host="127.0.0.1",
        port=0,
        heartbeat_interval=2.0,
        lost_after=20.0,
        site_wait_timeout=60.0,
        site_env=site_env,
    )
    port = server.start()
    host = _SitesHost(f"127.0.0.1:{port}", workspace, sites, threads)
    interrupted = threading.Event()
    previous_handler = None

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.set()

    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    record: JobRecord | None = None
    try:
        host.start()
        if not host.wait_registered(server, 120.0):
            log.error("the sites did not connect within 120 s")
            raise SystemExit(1)
        staging = Path(tempfile.mkdtemp(prefix="job-", dir=server.staging_dir))
        shutil.copytree(job_dir, staging / "job", ignore=shutil.ignore_patterns("__pycache__"))
        record = server.jobs.submit(staging / "job")
        shutil.rmtree(staging, ignore_errors=True)
        log.info("simulating %s with %s (workspace %s)", record.name, ", ".join(sites), workspace)
        deadline = None if timeout is None else time.monotonic() + timeout
        show = sys.stderr.isatty() if progress is None else progress
        with _Progress(show) as display:
            while record.status not in TERMINAL:
                if interrupted.is_set():
                    log.warning("interrupted: stopping the job and every process it started")
                    server.jobs.abort(record.job_id)
                    server.jobs.wait(record.job_id, 30)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    log.error("the simulation did not finish within %.0f s; aborting", timeout)
                    server.jobs.abort(record.job_id)
                    server.jobs.wait(record.job_id, 30)
                    break
                display.update(record)
                server.jobs.wait(record.job_id, 0.25)
    finally:
        # Scripts of a job that ended were told so: they get time to exit on their own.
        host.stop(graceful=record is not None and record.status in TERMINAL and not interrupted.is_set())
        server.stop()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    assert record is not None
    print(_summary(record, server.jobs.job_dir(record.job_id), time.monotonic() - started), flush=True)
    if interrupted.is_set():
        return 130
    return 0 if record.status == "finished" else 1


class _SitesHost:
    """The simulated sites: child processes running a SiteAgent per site (threads).

    Keeping the sites out of the server's process lets the two sides of every transfer use a
    core each; with several cores the sites are spread over as many processes (one process when
    ``threads`` limits how many train at once, since that limit is kept inside a process). The
    children's output comes back line by line through this process's stderr.
    """

    def __init__(self, server: str, workspace: Path, sites: list[str], threads: int | None) -> None:
        groups = 1 if threads else max(1, min(len(sites), os.cpu_count() or 1))
        self.commands = [
            [
                sys.executable, "-m", "fl.simulator", "--server", server, "--workspace", str(workspace),
                "--sites", ",".join(sites[i::groups]), "--threads", str(threads or 0),
                "--log-format", os.environ.get("FL_LOG_FORMAT", "text"),
            ]
            for i in range(groups)
        ]  # fmt: skip
        self.sites = sites
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for command in self.commands:
            proc = popen_bound_to_parent(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self.procs.append(proc)
            threading.Thread(target=self._forward, args=(proc,), name="fl-sites-output", daemon=True).start()

    @staticmethod
    def _forward(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            sys.stderr.write(raw.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    def wait_registered(self, server: FLServer, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.sites) <= set(server.registry.connected_sites()):
                return True
            if any(proc.poll() is not None for proc in self.procs):
                return False
            time.sleep(0.05)
        return False

    def stop(self, *, graceful: bool) -> None:
        for proc in self.procs:
            if proc.poll() is not None or proc.stdin is None:
                continue
            try:
                proc.stdin.write(b"finish\n" if graceful else b"stop\n")
                proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 40
        for proc in self.procs:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _run_sites(argv: list[str] | None = None) -> int:
    """Child process of the simulator: the site agents, until the parent says stop on stdin."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fl.simulator")
    parser.add_argument("--server", required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--sites", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    setup_logging(args.log_format)
    sites = args.sites.split(",")
    gate = threading.Semaphore(args.threads) if 0 < args.threads < len(sites) else None
    memory = _memory_folder()
    exchange = memory[0] if memory else None
    agents = [
        SiteAgent(
            name,
            args.server,
            Path(args.workspace) / name,
            task_gate=gate,
            exchange_root=exchange / name if exchange else None,
        )
        for name in sites
    ]
    for agent in agents:
        agent.start()
    command = sys.stdin.readline().strip()  # "finish", "stop", or EOF when the parent died
    if command == "finish":
        for agent in agents:
            agent.wait_idle(10.0)
    for agent in agents:
        agent.stop("simulation over")
    if memory is not None:
        shutil.rmtree(memory[0], ignore_errors=True)
        os.close(memory[1])
    return 0


SHM = Path("/dev/shm")
OWNER = ".owner"  # held with flock by the process that made the folder, for as long as it lives
STALE_GRACE_S = 30.0


def _memory_folder(shm: Path = SHM) -> tuple[Path, int] | None:
    """A private folder in /dev/shm for the models that pass between agents and scripts, if any,
    with the descriptor of its lock (kept open for the life of this process).

    A process killed with SIGKILL cannot remove its folder, and what it leaves in /dev/shm holds
    memory until the machine restarts; so the folder carries a lock that the kernel releases when
    its process dies, however it dies, and every start removes the folders whose lock is free.
    """
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    _sweep_stale(shm)
    folder = Path(tempfile.mkdtemp(prefix="fl-sim-", dir=shm))
    fd = os.open(folder / OWNER, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else can hold it
    os.write(fd, f"{os.getpid()}\n".encode())
    return folder, fd


def _sweep_stale(shm: Path) -> list[Path]:
    """Remove this user's simulator folders in ``shm`` whose owning process is gone; returns them."""
    removed = []
    now = time.time()
    for folder in shm.glob("fl-sim-*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            owner = folder / OWNER
            if not owner.exists():  # just made (its owner is about to lock it), or from an older fl
                if now - folder.stat().st_mtime > STALE_GRACE_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
                continue
            fd = os.open(owner, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            if now - owner.stat().st_mtime <= STALE_GRACE_S:  # never a folder whose owner is still starting
                continue
            log.info("removing %s, left by a simulator process that no longer runs", folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def logging_configured() -> bool:
    import logging

    return any(getattr(h, "_fl_handler", False) for h in logging.getLogger("fl").handlers)


if __name__ == "__main__":
    sys.exit(_run_sites())
