"""The simulator: a real fl server and one site agent per site, on loopback, running one job.

It is the production code path (gRPC, chunked safetensors, a process per training script), not a
second implementation; only TLS is off, which is allowed on loopback alone. On a terminal it shows
progress; it ends with a summary of the results and where they are.

A workspace keeps every run: each run is a job of its own in ``WORKSPACE/server/jobs/<job-id>/``
(sites: ``WORKSPACE/<site>/<job-id>/``), and ``WORKSPACE/latest`` links to the newest. A run holds
an flock on ``WORKSPACE/.fl-simulation.lock`` for its whole life, so a second run into the same
workspace is refused (naming the PID of the first) instead of breaking it.

There is no wall-clock limit by default (``timeout=None``): how long a run takes depends on the
data (CIFAR10 on a CPU takes minutes a round) and FedAvg's ``round_timeout`` (3600 s, FLARE's)
already ends a round whose sites stay silent; instead, every ``status_interval`` seconds (30) a
waiting round says which sites it waits for and what was last heard from them, so a hung script
shows at once. Pass ``timeout`` to bound a run (e.g. in CI).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fl import simulator_memory as sim_memory
from fl.components.script_executor import LAUNCH_ONCE_ENV, choose_launch_once, job_launch_once, launch_mode_line
from fl.fsutil import atomic_write_json, owned_folder, read_json, sweep_owned_folders
from fl.log import adapter, setup_logging
from fl.process import popen_bound_to_parent
from fl.pythonpath import module_command
from fl.rounds import model_label
from fl.server.app import FLServer, rpc_workers_for
from fl.server.jobs import TERMINAL, JobRecord
from fl.server.jobstore import JobError, JobSpec, read_job
from fl.site import fork_server
from fl.site.agent import STOP_WAIT_S, SiteAgent
from fl.site.gate import RunGate
from fl.site.loops import SharedLoops
from fl.site.shared_downloads import SharedDownloads
from fl.transport import make_channel

__all__ = ["WorkspaceBusy", "simulate", "workspace_lock"]

log = adapter("fl.simulator")
MARKER = ".fl-simulation"
LOCK = ".fl-simulation.lock"
LATEST = "latest"
#: Seconds between "still waiting for" lines in the simulator (a server's default is 60).
SIM_STATUS_INTERVAL_S = 30.0


def _site_names(spec: JobSpec, n_clients: int | None, clients: list[str] | None) -> list[str]:
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


def _sampled_per_round(spec: JobSpec) -> int | None:
    """The most sites any of the job's workflows asks to train a round (``num_clients``), if they say."""
    workflows = spec.server_config.get("workflows", [])
    counts = [w["args"]["num_clients"] for w in workflows if isinstance(w.get("args", {}).get("num_clients"), int)]
    return max(counts) if counts else None


#: Sites training at once a core when the simulator chooses (more sites than that, or all at once would
#: not fit in memory): their scripts run per task, and a light script's run is mostly starting and ending
#: a process and waiting on its channel, not computing, so runs overlap on a core. Measured on 2 cores
#: (64 hello-pt sites, 16 samples each): 13-15 s a round with 8 at once, 25-28 s with 2, the same peak
#: memory (0.7 GiB); all 64 at once (scripts that run once) needed 16 GiB by the estimate and, on a loaded
#: machine, starved the sites' heartbeats until the server declared sites lost.
AUTO_RUNS_PER_CORE = 4


def _check_memory(
    spec: JobSpec, n_sites: int, threads: int | None, site_memory: int | None, launch_once: bool | None = None
) -> int | None:
    """The sites that train at once (``threads``; None: all), checked against the memory the machine
    has left: refused (JobError, saying what to change) when it does not fit. Without ``threads``,
    every site trains at once when there are at most :data:`AUTO_RUNS_PER_CORE` a core and that fits;
    otherwise that many a core (at most as many as fit), their scripts run per task
    (:func:`fl.components.script_executor.choose_launch_once`). ``launch_once``: the job's own setting.

    The estimate counts the scripts that exist at once: every site's when they run once for the whole job
    (an idle one holds its imports as a training one does), else the runs at once (of the sampled sites)."""
    available, where = sim_memory.available_memory()
    model_bytes = sim_memory.model_bytes_of(spec.folder)
    per_site = site_memory if site_memory is not None else sim_memory.TRAINING_SITE_BYTES
    sampled = min(n_sites, _sampled_per_round(spec) or n_sites)

    def need(at: int | None) -> sim_memory.MemoryEstimate:
        once, _ = choose_launch_once(launch_once, n_sites, at)
        scripts = n_sites if once else min(at or n_sites, sampled)
        return sim_memory.estimate(n_sites, scripts, model_bytes, per_site)

    if threads is None:
        cores = os.cpu_count() or 1
        most = AUTO_RUNS_PER_CORE * cores
        all_at_once = need(None)
        too_many = n_sites > most
        if too_many or all_at_once.total > available:
            # Per task, more at once than the sampled sites (or than all but one) would change nothing.
            top = most if launch_once else min(most, sampled if sampled < n_sites else n_sites - 1)
            fitting = [t for t in range(top, 0, -1) if need(t).total <= available]
            if fitting:
                why = (
                    f"{n_sites} sites on {cores} cores"
                    if too_many and all_at_once.total <= available
                    else f"every site training at once would need an estimated {all_at_once.describe()}, "
                    f"{available / sim_memory.GiB:.2f} GiB is {where}"
                )
                log.info(
                    "%s: %d train at once (%d a core; -t/--threads to choose)", why, fitting[0], AUTO_RUNS_PER_CORE
                )
                threads = fitting[0]
    estimate = need(threads)
    problem = sim_memory.refusal(estimate, available, where, threads=threads)
    if problem is not None:
        raise JobError(problem)
    log.info("memory estimate: %s; %.2f GiB %s", estimate.describe(), available / sim_memory.GiB, where)
    return threads


def _refuse_foreign_workspace(workspace: Path) -> None:
    """A folder holding a server workspace that is not a simulation's is not ours to use."""
    if not (workspace / MARKER).exists() and (workspace / "server").exists():
        raise JobError(f"{workspace} holds a server workspace that is not a simulation's; use another -w")


def _prepare_workspace(workspace: Path) -> None:
    """Make ``workspace`` ready for a new run, keeping earlier runs' results.

    Call with the workspace locked: a job left unfinished there belongs to a run that was killed,
    and is marked so (a server would otherwise resume it before this run's job).
    """
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text("fl simulator workspace\n")
    for status_file in sorted((workspace / "server" / "jobs").glob("*/status.json")):
        record = read_json(status_file)
        if isinstance(record, dict) and record.get("status") not in (*TERMINAL, None):
            record.update(status="aborted", message="its simulation ended before the job did (killed?)")
            record["ended"] = record.get("ended") or status_file.stat().st_mtime
            atomic_write_json(status_file, record)
            log.info("job %s was left unfinished by an earlier run here: marked aborted", record.get("job_id"))


_held_locks: dict[Path, tuple[int, int]] = {}  # workspace -> (descriptor, how many holders here)
_held_guard = threading.Lock()


class WorkspaceBusy(JobError):
    """Another simulation holds the workspace."""


@contextlib.contextmanager
def workspace_lock(workspace: Path) -> Iterator[None]:
    """Hold the workspace's flock for a run (re-entrant in one process; ``simulator_run`` holds it
    across export and simulation). Raises :class:`WorkspaceBusy` naming the PID that holds it."""
    workspace = workspace.resolve()
    with _held_guard:
        held = _held_locks.get(workspace)
        if held is None:
            _refuse_foreign_workspace(workspace)
            workspace.mkdir(parents=True, exist_ok=True)
            fd = os.open(workspace / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise WorkspaceBusy(
                    f"{workspace} is in use by another simulation (PID {holder}); wait for it to end "
                    "or give this run another workspace (-w, or simulator_run's workspace)"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            held = (fd, 0)
        _held_locks[workspace] = (held[0], held[1] + 1)
    try:
        yield
    finally:
        with _held_guard:
            fd, count = _held_locks.pop(workspace)
            if count > 1:
                _held_locks[workspace] = (fd, count - 1)
            else:
                os.close(fd)  # releases the flock; the file stays (removing it would race a new holder)


def _link_latest(workspace: Path, run_dir: Path) -> None:
    """Point ``WORKSPACE/latest`` at the newest run's job folder (replacing the link atomically)."""
    link = workspace / LATEST
    if link.exists() and not link.is_symlink():
        return  # something of the user's: leave it
    tmp = workspace / f".{LATEST}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_dir.relative_to(workspace))
    os.replace(tmp, link)


class _ConsoleLines:
    """A text stream that prints whole lines above a rich Live display, from any thread, so that a
    log line and the progress line never share a terminal line."""

    def __init__(self, console: Any) -> None:
        self._console = console
        self._lock = threading.Lock()
        self._partial = ""

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            self._print(lines)
        return len(text)

    def flush(self) -> None:
        """Nothing to do: every whole line is printed as it arrives."""

    def finish(self) -> None:
        """Print what came after the last newline (when the display ends)."""
        with self._lock:
            partial, self._partial = self._partial, ""
            self._print([partial] if partial else [])

    def _print(self, lines: list[str]) -> None:
        from rich.text import Text

        for line in lines:
            self._console.print(Text.from_ansi(line), soft_wrap=True)

    def isatty(self) -> bool:
        return True


class _Progress:
    """Round and sites-done display: a rich status line on a terminal, nothing extra otherwise.

    While it shows, fl's log handlers on stderr and the sites' forwarded output (sys.stderr) go
    through the display's console, which prints each line above the status line.
    """

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self.enabled = enabled
        self._console = console
        self._live: Any = None
        self._text = ""
        self._rerouted: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._stderr: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            # Bound to the real stderr: a Console(stderr=True) looks sys.stderr up on every write, and
            # would then write its own display into the rerouted stream (and deadlock on its lock).
            console = self._console or Console(file=sys.stderr)
            self._spinner = Spinner("dots", text="starting")
            self._live = Live(
                self._spinner,
                console=console,
                refresh_per_second=8,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.__enter__()
            self._route_output(_ConsoleLines(console))
        return self

    def _route_output(self, lines: _ConsoleLines) -> None:
        """Send sys.stderr and the fl log handlers that write to it through ``lines``."""
        self._stderr = sys.stderr
        for handler in logging.getLogger("fl").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stderr:
                self._rerouted.append((handler, handler.setStream(lines)))
        sys.stderr = lines

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
        if self._live is None:
            return
        if isinstance(sys.stderr, _ConsoleLines):
            sys.stderr.finish()
        sys.stderr = self._stderr
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted.clear()
        self._live.__exit__(None, None, None)


def _summary(record: JobRecord, run_dir: Path, elapsed: float) -> str:
    """The run's last words: status, the key metric of every model (labels from fl.rounds), the best
    model (or why there is none) and where the results are."""
    lines = [
        f"{record.name} {record.status} in {elapsed:.1f} s"
        + (f": {record.num_rounds} rounds on {', '.join(record.sites)}" if record.sites else "")
    ]
    if record.message:
        lines.append(f"  {record.message}")
    validation = read_json(run_dir / "validation.json") or {}
    models = validation.get("models", [])
    best = read_json(run_dir / "best_model.json")
    chosen = best if best and best.get("model_version") is not None else None
    if models:
        keys = sorted({k for m in models for k in m.get("aggregate", {})})
        key = best["key_metric"] if best else (keys[0] if keys else None)
        scored = [m for m in models if key in m.get("aggregate", {})]
        if key and scored:
            history = ", ".join(
                f"{model_label(m['model_version'], record.num_rounds)} {m['aggregate'][key]:.4f}" for m in scored
            )
            lines.append(f"  {key}: {history}")
            lines.append(f"  final {key}: {scored[-1]['aggregate'][key]:.4f}")
    if chosen:
        which = model_label(chosen["model_version"], record.num_rounds)
        lines.append(f"  best {chosen['key_metric']}: {chosen['score']:.4f} ({which})")
    elif best and best.get("reason"):
        lines.append(f"  no best model: {best['reason']}")
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
    status_interval: float | None = None,
    site_memory: int | None = None,
    fresh_processes: bool = False,
) -> int:
    """Run an exported job; returns 0 when it finished, 1 when it failed, 2 when it could not start
    (bad job, workspace in use, more memory needed than the machine has), 130 on Ctrl-C.

    ``timeout``: seconds the whole run may take (default: no limit; see the module's docstring).
    ``status_interval``: seconds between the lines that say whom a waiting round waits for (30).
    ``site_memory``: bytes one site's script needs while it trains, for the memory estimate
    (default :data:`fl.simulator_memory.TRAINING_SITE_BYTES`).
    ``fresh_processes``: in per-task mode, fork a process for each run instead of running it on a
    reused worker (:mod:`fl.site.warm_worker`; what a fresh process would see, faster).
    """
    if not logging_configured():
        setup_logging()
    job_dir = Path(job_dir).resolve()
    workspace = Path(workspace).resolve()
    held = contextlib.ExitStack()
    try:
        spec = read_job(job_dir)
        sites = _site_names(spec, n_clients, clients)
        job_setting = job_launch_once(job_dir)
        threads = _check_memory(spec, len(sites), threads, site_memory, job_setting)
        held.enter_context(workspace_lock(workspace))
        _prepare_workspace(workspace)
    except JobError as exc:
        held.close()
        log.error("%s", exc)
        return 2
    with held:
        interval = status_interval or SIM_STATUS_INTERVAL_S
        return _run(job_dir, workspace, sites, threads, job_setting, gpu, timeout, progress, interval, fresh_processes)


def _run(
    job_dir: Path,
    workspace: Path,
    sites: list[str],
    threads: int | None,
    job_launch_once_setting: bool | None,
    gpu: str | None,
    timeout: float | None,
    progress: bool | None,
    status_interval: float,
    fresh_processes: bool = False,
) -> int:
    """The run itself, in a locked and prepared workspace (see :func:`simulate`); ``job_launch_once_setting``:
    the job's own ``launch_once`` (:func:`fl.components.script_executor.job_launch_once`)."""
    concurrent = min(threads or len(sites), len(sites))
    per_site = max(1, (os.cpu_count() or 1) // concurrent)
    gpus = [g.strip() for g in gpu.split(",")] if gpu else []
    launch_once, why = choose_launch_once(job_launch_once_setting, len(sites), threads)
    log.info("%s", launch_mode_line(launch_once, why, reused=not fresh_processes))

    def site_env(site: str, n: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(per_site), "MKL_NUM_THREADS": str(per_site), "FL_TORCH_THREADS": str(per_site)}
        env[LAUNCH_ONCE_ENV] = "1" if launch_once else "0"
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[sites.index(site) % len(gpus)] if site in sites else gpus[0]
        return env

    started = time.monotonic()
    # One warm worker for the run, shared by its sites hosts: it imports torch while the server starts
    # and the sites register, and the scripts start as its forks.
    warm = fork_server.start_or_explain(reuse=not fresh_processes)
    try:
        server = _sim_server(workspace / "server", len(sites), site_env, status_interval)
        port = server.start()
    except BaseException:
        if warm is not None:
            warm.stop()
        raise
    host = _SitesHost(
        f"127.0.0.1:{port}",
        workspace,
        sites,
        threads,
        fork_socket=warm.socket_path if warm is not None else None,
    )
    interrupted = threading.Event()
    previous_handler = None

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.set()

    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    record: JobRecord | None = None
    broken = False  # a sites host died: the run ends at once, its scripts get no grace
    try:
        host.start()
        problem = host.wait_registered(server, 120.0)
        if problem is not None:
            log.error("%s", problem)
            return 1
        staging = Path(tempfile.mkdtemp(prefix="job-", dir=server.staging_dir))
        shutil.copytree(job_dir, staging / "job", ignore=shutil.ignore_patterns("__pycache__"))
        record = server.jobs.submit(staging / "job")
        shutil.rmtree(staging, ignore_errors=True)
        _link_latest(workspace, server.jobs.job_dir(record.job_id))
        log.info("simulating %s with %s (workspace %s)", record.name, ", ".join(sites), workspace)
        deadline = None if timeout is None else time.monotonic() + timeout
        show = sys.stderr.isatty() if progress is None else progress
        with _Progress(show) as display:
            while record.status not in TERMINAL:
                if interrupted.is_set():
                    log.warning("interrupted: stopping the job and every process it started")
                    server.jobs.abort(record.job_id, "interrupted (Ctrl-C): the simulator stopped the job")
                    server.jobs.wait(record.job_id, 30)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    log.error("the simulation did not finish within %.0f s; aborting", timeout)
                    reason = f"the simulation did not finish within its timeout ({timeout:g} s)"
                    server.jobs.abort(record.job_id, reason)
                    server.jobs.wait(record.job_id, 30)
                    break
                exited = host.exited()
                if exited is not None:
                    exited += " during the job (its output is above)"
                    log.error("%s: aborting the job", exited)
                    server.jobs.abort(record.job_id, exited)
                    server.jobs.wait(record.job_id, 30)
                    broken = True
                    break
                display.update(record)
                server.jobs.wait(record.job_id, 0.25)
    finally:
        # Scripts of a job that ended were told so: they get time to exit on their own.
        ended = record is not None and record.status in TERMINAL
        host.stop(graceful=ended and not interrupted.is_set() and not broken)
        if warm is not None:
            warm.stop()
        server.stop()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    assert record is not None
    print(_summary(record, server.jobs.job_dir(record.job_id), time.monotonic() - started), flush=True)
    if interrupted.is_set():
        return 130
    return 0 if record.status == "finished" else 1


@dataclass(frozen=True)
class Liveness:
    """How often a simulation's sites speak while idle, chosen from how many there are (:func:`liveness`)."""

    heartbeat_interval: float
    lost_after: float
    rpc_workers: int


#: Heartbeats a second the server hears from all sites together, at most: the interval grows with the
#: sites (2 s up to 20 sites, 20 s for 200, 60 s from 600), as a heartbeat costs ~2 ms of CPU.
HEARTBEATS_PER_S = 10.0
#: The longest heartbeat interval; a site is declared lost after 4 intervals without a word, and never
#: before SIM_LOST_AFTER_S.
MAX_HEARTBEAT_S = 60.0
#: The least silence after which a simulated site is declared lost. A sites host that dies is seen at
#: once (its process exits: the run aborts), and a hung one by the round's timeout; what a short loss
#: timeout caught here was a host starved of CPU by its own scripts (64 at once on 2 loaded cores: 20
#: sites silent for 27-53 s, declared lost, the job failed) — slow, not lost.
SIM_LOST_AFTER_S = 120.0
#: A simulated site's long poll waits this long (the server caps a poll at 60 s): an idle site polls
#: once a minute, while a directive still reaches it at once.
SIM_POLL_WAIT_S = 55.0
# A sites host at the end of a run: how long its sites' scripts may take to exit after their jobs ended
# (all sites together), and how many sites it stops at once. The parent waits HOST_GRACE_S for it.
FINISH_WAIT_S = 10.0
STOPPING_THREADS = 32
HOST_GRACE_S = 40.0
#: Channels (TCP connections) a sites host's agents share: gRPC multiplexes their calls; a few keep
#: model transfers of different sites off one connection's flow-control window.
CHANNELS_PER_HOST = 4
#: The sites processes' shared download index, in the simulator's workspace.
SHARED_DOWNLOADS_FOLDER = ".downloads"


def liveness(n_sites: int) -> Liveness:
    """The heartbeat, loss and poll settings for a simulation of ``n_sites`` sites (see the constants)."""
    heartbeat = min(MAX_HEARTBEAT_S, max(2.0, n_sites / HEARTBEATS_PER_S))
    return Liveness(
        heartbeat_interval=heartbeat,
        lost_after=max(SIM_LOST_AFTER_S, 4 * heartbeat),
        rpc_workers=rpc_workers_for(n_sites),  # every site's long poll holds a server thread
    )


def _sim_server(
    folder: Path, n_sites: int, site_env: Callable[[str, int], dict[str, str]] | None, status_interval: float
) -> FLServer:
    """The simulation's server on loopback, its liveness settings chosen for ``n_sites`` sites."""
    settings = liveness(n_sites)
    return FLServer(
        folder,
        host="127.0.0.1",
        port=0,
        heartbeat_interval=settings.heartbeat_interval,
        lost_after=settings.lost_after,
        site_wait_timeout=60.0,
        site_env=site_env,
        status_interval=status_interval,
        max_workers=settings.rpc_workers,
    )


class _SitesHost:
    """The simulated sites: child processes running a SiteAgent per site (threads).

    Keeping the sites out of the server's process lets the two sides of every transfer use a
    core each; with several cores the sites are spread over as many processes (one process when
    ``threads`` limits how many train at once, since that limit is kept inside a process). The
    children's output comes back line by line through this process's stderr.
    """

    def __init__(
        self,
        server: str,
        workspace: Path,
        sites: list[str],
        threads: int | None,
        *,
        fork_socket: Path | None = None,
    ) -> None:
        groups = 1 if threads else max(1, min(len(sites), os.cpu_count() or 1))
        self.commands = [
            module_command(
                "fl.simulator", "--server", server, "--workspace", str(workspace),
                "--sites", ",".join(sites[i::groups]), "--threads", str(threads or 0),
                "--log-format", os.environ.get("FL_LOG_FORMAT", "text"),
                *(["--fork-socket", str(fork_socket)] if fork_socket is not None else []),
            )
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

    def wait_registered(self, server: FLServer, timeout: float) -> str | None:
        """Wait until every site registered; returns None, or what went wrong instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            connected = set(server.registry.connected_sites())
            if set(self.sites) <= connected:
                return None
            exited = self.exited()
            if exited is not None:
                return f"{exited} before its sites connected (its output is above)"
            time.sleep(0.05)
        missing = ", ".join(s for s in self.sites if s not in server.registry.connected_sites())
        return f"sites {missing} did not connect within {timeout:.0f} s (their processes still run; output above)"

    def exited(self) -> str | None:
        """Which sites process has exited (e.g. killed), and how; None while all run."""
        for command, proc in zip(self.commands, self.procs, strict=True):
            if proc.poll() is not None:
                names = command[command.index("--sites") + 1].split(",")
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                return f"the site process for {shown} exited with code {proc.returncode}"
        return None

    def stop(self, *, graceful: bool) -> None:
        for proc in self.procs:
            if proc.poll() is not None or proc.stdin is None:
                continue
            try:
                proc.stdin.write(b"finish\n" if graceful else b"stop\n")
                proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + HOST_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("a sites host did not exit within %.0f s of the run's end: killed", HOST_GRACE_S)
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
    parser.add_argument("--fork-socket", help="the run's warm fork worker: scripts start as its forks")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    setup_logging(args.log_format)
    warm = fork_server.attach(Path(args.fork_socket)) if args.fork_socket else None  # the run's, its parent owns it
    sites = args.sites.split(",")
    gate = RunGate(args.threads) if 0 < args.threads < len(sites) else None
    memory = _memory_folder()
    exchange = memory[0] if memory else None
    # The agents share a few channels and one set of loops: an idle site costs no thread and no connection.
    channels = [make_channel(args.server, tls=None) for _ in range(min(len(sites), CHANNELS_PER_HOST))]
    loops = SharedLoops()
    # Every sites process of this run shares one index (in the workspace): a model is downloaded once a machine.
    shared = SharedDownloads(Path(args.workspace) / SHARED_DOWNLOADS_FOLDER)
    agents = [
        SiteAgent(
            name,
            args.server,
            Path(args.workspace) / name,
            task_gate=gate,
            exchange_root=exchange / name if exchange else None,
            channel=channels[i % len(channels)],
            poll_wait=SIM_POLL_WAIT_S,
            shared_downloads=shared,
        )
        for i, name in enumerate(sites)
    ]
    for agent in agents:
        agent.start(loops)
    command = sys.stdin.readline().strip()  # "finish", "stop", or EOF when the parent died
    # One deadline for all the sites (one each would add up past the parent's grace with hundreds),
    # and their scripts stopped side by side (a script may take 10 s to leave after SIGTERM).
    if command == "finish":
        idle_by = time.monotonic() + FINISH_WAIT_S
        for agent in agents:
            agent.wait_jobs_done(idle_by)
    with ThreadPoolExecutor(max_workers=STOPPING_THREADS, thread_name_prefix="fl-stop") as pool:
        list(pool.map(lambda agent: agent.request_stop("simulation over"), agents))
    closed_by = time.monotonic() + STOP_WAIT_S
    for agent in agents:
        agent.close(closed_by)
    if warm is not None:
        warm.stop()
    loops.stop()
    for channel in channels:
        channel.close()
    if memory is not None:
        shutil.rmtree(memory[0], ignore_errors=True)
        os.close(memory[1])
    return 0


SHM = Path("/dev/shm")


def _memory_folder(shm: Path = SHM) -> tuple[Path, int] | None:
    """A private folder in /dev/shm for the models that pass between agents and scripts, if any,
    with the descriptor of its lock (kept open for the life of this process).

    A process killed with SIGKILL cannot remove its folder, and what it leaves in /dev/shm holds
    memory until the machine restarts; so the folder is an :func:`fl.fsutil.owned_folder`, and every
    start removes the folders whose owner is gone.
    """
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    return owned_folder(shm, "fl-sim-")


def _sweep_stale(shm: Path) -> list[Path]:
    """Remove this user's simulator folders in ``shm`` whose owning process is gone; returns them."""
    return sweep_owned_folders(shm, "fl-sim-")


def logging_configured() -> bool:
    import logging

    return any(getattr(h, "_fl_handler", False) for h in logging.getLogger("fl").handlers)


if __name__ == "__main__":
    sys.exit(_run_sites())
