"""Shared measurement code: follow a process tree's memory, time it, and guard the machine.

:class:`TreeSampler` polls a process tree (the root and every descendant, plus any process that
was once seen in the tree and got re-parented, plus strays that carry the tree's tag in their
environment) every ``interval`` seconds with psutil and records:

* peak summed PSS of the tree (falls back to RSS, per process, when PSS cannot be read; the
  result says which),
* peak summed RSS of the tree,
* peak tmpfs bytes of the tree and peak PSS + tmpfs (sampled together),
* peak RSS of a chosen process (e.g. the FL server), picked by a predicate on its cmdline,
* peak RSS per named role (``roles``: name -> cmdline predicate; the largest matching process),
* the largest number of processes seen at once.

The memory cap (default 14 GiB; env ``FL_BENCH_MEM_CAP_GIB``) cannot be outrun: where the machine
allows, the tree runs in a memory cgroup of its own (v1 or v2, made below this process's cgroup, swap
capped too), so the kernel stops it at the cap; elsewhere a separate watchdog process polls the tree's
summed RSS every 20 ms. The sampler also kills the tree when its PSS plus its tmpfs bytes
(``TMPFS_COUNTERS``: fl's ``/dev/shm/fl-sim-*`` folders) pass the cap, or when the machine's
available memory falls under a floor. The result then says ``"did not finish: out of memory at N GiB
(<mechanism>)"``; a timeout does the same with ``"did not finish: timeout N s"``. Every kill is by PID,
each checked against its start time.

:func:`run_measured` runs a command under the sampler and returns a plain dict.

Only psutil and the standard library are used: this module is imported both by the project's
benchmark and by the anchor scenario scripts that run inside the anchors' own venvs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

GiB = 1024**3
MiB = 1024**2
DEFAULT_MEM_CAP_GIB = float(os.environ.get("FL_BENCH_MEM_CAP_GIB", "14"))
# Kill the tree too if the machine as a whole runs this low (it is shared).
DEFAULT_MIN_AVAILABLE_GIB = float(os.environ.get("FL_BENCH_MIN_AVAILABLE_GIB", "1.5"))
MAX_SAMPLE_GAP_S = 0.5
TAG_ENV = "FL_BENCH_TREE_TAG"

CmdlinePredicate = Callable[[Sequence[str]], bool]


def cmdline_contains(*needles: str) -> CmdlinePredicate:
    """A predicate that is true when every needle occurs in the joined cmdline."""

    def pred(cmdline: Sequence[str]) -> bool:
        joined = " ".join(cmdline)
        return all(n in joined for n in needles)

    return pred


def _proc_key(p: psutil.Process) -> tuple[int, float]:
    try:
        return (p.pid, p.create_time())
    except psutil.Error:
        return (p.pid, 0.0)


# ------------------------------------------------------------------------------------------------
# The hard cap: a memory cgroup around the measured tree (the kernel enforces it)
# ------------------------------------------------------------------------------------------------
CGROUP_ROOT = "/sys/fs/cgroup"


def _own_cgroup_paths() -> tuple[str | None, str | None]:
    """This process's memory cgroup path in cgroup v1 and its cgroup v2 path ("0::"), from /proc/self/cgroup."""
    v1 = v2 = None
    try:
        lines = open("/proc/self/cgroup").read().splitlines()  # noqa: SIM115
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v1, v2


def _v2_mount() -> str | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup when unified, .../unified when hybrid)."""
    for candidate in (CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")):
        if os.path.exists(os.path.join(candidate, "cgroup.controllers")):
            return candidate
    return None


class MemoryCgroup:
    """A memory cgroup made below this process's own (as tests/e2e/local_cluster/up.sh does), holding
    the measured tree from its first instruction: the kernel enforces the limit, so no tree can outrun
    a sampler. Swap is capped too (memory+swap = the limit), so a tree at its cap is OOM-killed, never
    swapped. Its page cache and the tmpfs pages its processes write are charged to it.
    """

    def __init__(self, path: str, version: int, limit_bytes: int) -> None:
        self.path = path
        self.version = version
        self.limit_bytes = limit_bytes

    @classmethod
    def create(cls, limit_bytes: int, name: str) -> MemoryCgroup | None:
        """A fresh cgroup limited to ``limit_bytes``, or None where this machine does not allow one."""
        v1, v2 = _own_cgroup_paths()
        if v1 is not None and os.path.isdir(os.path.join(CGROUP_ROOT, "memory")):
            path = os.path.join(CGROUP_ROOT, "memory", v1.lstrip("/"), name)
            files = [("memory.limit_in_bytes", True), ("memory.memsw.limit_in_bytes", False)]
            made = cls._make(path, files, limit_bytes, 1)
            if made is not None:
                return made
        mount = _v2_mount()
        if v2 is not None and mount is not None:
            parent = os.path.join(mount, v2.lstrip("/"))
            with contextlib.suppress(OSError):
                if "memory" not in open(os.path.join(parent, "cgroup.subtree_control")).read().split():  # noqa: SIM115
                    _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
            files = [("memory.max", True), ("memory.swap.max", False)]
            return cls._make(os.path.join(parent, name), files, limit_bytes, 2, swap_value="0")
        return None

    @classmethod
    def _make(
        cls, path: str, files: list[tuple[str, bool]], limit: int, version: int, swap_value: str | None = None
    ) -> MemoryCgroup | None:
        try:
            os.mkdir(path)
        except OSError:
            return None
        group = cls(path, version, limit)
        for fname, required in files:
            value = swap_value if (swap_value is not None and not required) else str(limit)
            try:
                _write(os.path.join(path, fname), value)
            except OSError:
                if required:
                    group.close()
                    return None
        return group

    def join(self) -> None:
        """Move the calling process into the cgroup (called in the child between fork and exec)."""
        _write(os.path.join(self.path, "cgroup.procs"), str(os.getpid()))

    def _read(self, fname: str) -> str:
        try:
            with open(os.path.join(self.path, fname)) as f:
                return f.read()
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return [int(x) for x in self._read("cgroup.procs").split()]

    def peak_bytes(self) -> int | None:
        """The largest charge the cgroup saw (tree memory, its tmpfs pages and its page cache)."""
        text = self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak").strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        """How many processes the kernel killed at the limit (memory.oom_control / memory.events)."""
        text = self._read("memory.oom_control" if self.version == 1 else "memory.events")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def close(self) -> None:
        """SIGKILL what is still in the cgroup, then remove it (its charges go to the parent)."""
        for _ in range(100):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        print(f"[bench.measure] could not remove cgroup {self.path}", file=sys.stderr)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def oom_status(limit_bytes: int) -> str:
    return f"did not finish: out of memory at {limit_bytes / GiB:g} GiB"


# ------------------------------------------------------------------------------------------------
# tmpfs bytes that belong to the tree (fl's simulator keeps models in /dev/shm during a round)
# ------------------------------------------------------------------------------------------------
SHM = "/dev/shm"
FL_SIM_OWNER = ".owner"  # fl/simulator.py: the pid of the process that made an fl-sim-* folder


def fl_sim_tmpfs_bytes(pids: set[int], shm: str = SHM) -> int:
    """fl's own count of its tmpfs bytes (``fl.footprint.tmpfs_bytes``: the run's ``fl-sim-*`` folders
    and removed files its processes still hold); 0 where fl is not importable (an anchor's venv)."""
    try:
        from fl.footprint import tmpfs_bytes as fl_tmpfs_bytes
    except ImportError:
        return 0
    return fl_tmpfs_bytes(pids, shm=Path(shm))


#: What the sampler adds to the tree's PSS as its tmpfs bytes: each counter gets the tree's pids.
#: A framework that exposes its own sum adds it here (one line).
TMPFS_COUNTERS: list[Callable[[set[int]], int]] = [fl_sim_tmpfs_bytes]


def tmpfs_bytes(pids: set[int]) -> int:
    total = 0
    for counter in TMPFS_COUNTERS:
        try:
            total += counter(pids)
        except Exception as e:  # a counter's failure must not stop the sampler
            print(f"[bench.measure] tmpfs counter {counter!r} failed: {e!r}", file=sys.stderr)
    return total


# ------------------------------------------------------------------------------------------------
# Where no cgroup can be made: a fast RSS watchdog in a process of its own
# ------------------------------------------------------------------------------------------------
WATCHDOG_INTERVAL_S = 0.02


def start_watchdog(root_pid: int, cap_gib: float, tag: str, reason_path: str) -> subprocess.Popen[bytes]:
    """A separate process that polls the tree's summed RSS every 20 ms (no PSS: cheap) and SIGKILLs the
    tree past ``cap_gib``, writing the reason to ``reason_path``: the driver's sampler thread can be
    slowed by what it measures, this process only watches."""
    cmd = [sys.executable, os.path.abspath(__file__), "--watchdog", str(root_pid), str(cap_gib), tag, reason_path]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _watchdog_main(root_pid: int, cap_gib: float, tag: str, reason_path: str) -> int:
    parent = os.getppid()

    def record(reason: str) -> None:
        with open(reason_path, "w") as f:
            f.write(reason)

    sampler = TreeSampler(
        root_pid,
        interval=WATCHDOG_INTERVAL_S,
        mem_cap_gib=cap_gib,
        tag=tag,
        tag_scan_s=0.5,
        on_kill=record,
        mechanism="RSS watchdog process",
    )
    sampler._pss_ok = False
    while os.getppid() == parent:
        try:
            if not sampler._root or not sampler._root.is_running():
                return 0
        except psutil.Error:
            return 0
        sampler.sample()
        time.sleep(WATCHDOG_INTERVAL_S)
    return 0


class TreeSampler:
    """Follow the memory of a process tree from a background thread.

    ``root_pid`` is the tree's root.  ``tag`` (optional) is a value of the ``FL_BENCH_TREE_TAG``
    environment variable that the launched tree inherits; a slow scan (every ``tag_scan_s``)
    picks up descendants that escaped the tree by double-forking.
    """

    def __init__(
        self,
        root_pid: int,
        *,
        interval: float = 0.075,
        server_predicate: CmdlinePredicate | None = None,
        mem_cap_gib: float | None = DEFAULT_MEM_CAP_GIB,
        min_available_gib: float | None = DEFAULT_MIN_AVAILABLE_GIB,
        timeout_s: float | None = None,
        tag: str | None = None,
        tag_scan_s: float = 1.0,
        include_root: bool = True,
        roles: dict[str, CmdlinePredicate] | None = None,
        on_kill: Callable[[str], None] | None = None,
        cgroup: MemoryCgroup | None = None,
        watchdog_reason_path: str | None = None,
        count_tmpfs: bool = True,
        mechanism: str = "PSS+tmpfs sampler",
    ) -> None:
        self.root_pid = root_pid
        self.cgroup = cgroup
        self.watchdog_reason_path = watchdog_reason_path
        self.count_tmpfs = count_tmpfs
        self.mechanism = mechanism
        self.peak_tmpfs = 0
        self.max_gap = 0.0
        self.peak_pss_plus_tmpfs = 0
        self.interval = interval
        self.server_predicate = server_predicate
        self.mem_cap_gib = mem_cap_gib
        self.min_available_gib = min_available_gib
        self.timeout_s = timeout_s
        self.tag = tag
        self.tag_scan_s = tag_scan_s
        self.include_root = include_root
        self.on_kill = on_kill
        self.roles = dict(roles or {})
        self.peak_role_rss: dict[str, int] = {}
        self._role_of: dict[tuple[int, float], list[str]] = {}

        self.t_start = time.monotonic()
        self.peak_pss = 0
        self.peak_rss_sum = 0
        self.peak_server_rss = 0
        self.server_seen = False
        self.server_cmdline: str | None = None
        self._n_pss_read = 0
        self._n_rss_fallback = 0
        self.max_procs = 0
        self.samples = 0
        self.peak_at_s: float | None = None
        self.killed_reason: str | None = None
        self.timeline: list[tuple[float, int, int]] = []  # (t, pss_sum, rss_sum), thinned

        self._known: dict[tuple[int, float], psutil.Process] = {}
        self._server_keys: dict[tuple[int, float], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._last_tag_scan = 0.0
        self._pss_ok = True  # set False to read RSS only
        self._lock = threading.Lock()
        try:
            self._root = psutil.Process(root_pid)
            self._known[_proc_key(self._root)] = self._root
        except psutil.Error:
            self._root = None

    # -- tree discovery -------------------------------------------------------------------
    def _discover(self) -> list[psutil.Process]:
        found: dict[tuple[int, float], psutil.Process] = {}
        roots = list(self._known.values())
        for p in roots:
            try:
                if not p.is_running():
                    continue
                found[_proc_key(p)] = p
                for c in p.children(recursive=True):
                    found.setdefault(_proc_key(c), c)
            except psutil.Error:
                continue
        now = time.monotonic()
        if self.tag and now - self._last_tag_scan >= self.tag_scan_s:
            self._last_tag_scan = now
            me = os.getpid()
            for p in psutil.process_iter():
                if p.pid == me:
                    continue
                key = _proc_key(p)
                if key in found:
                    continue
                try:
                    if p.environ().get(TAG_ENV) == self.tag:
                        found[key] = p
                except psutil.Error:
                    continue
        if self.cgroup is not None:  # the cgroup knows every process of the tree, double-forked or not
            for pid in self.cgroup.pids():
                if pid not in {k[0] for k in found}:
                    with contextlib.suppress(psutil.Error):
                        p = psutil.Process(pid)
                        found.setdefault(_proc_key(p), p)
        self._known = dict(found)
        if not self.include_root and self._root is not None:
            found.pop(_proc_key(self._root), None)
        return list(found.values())

    # -- one sample -------------------------------------------------------------------------
    def sample(self) -> None:
        procs = self._discover()
        pss_sum = rss_sum = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            pss = None
            if self._pss_ok:
                try:
                    pss = p.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    pss = None
                except psutil.Error:
                    continue
            if pss is None:
                pss = rss
                self._n_rss_fallback += 1
            else:
                self._n_pss_read += 1
            rss_sum += rss
            pss_sum += pss
            if self.server_predicate is not None:
                key = _proc_key(p)
                is_server = self._server_keys.get(key)
                if is_server is None:
                    try:
                        cmd = p.cmdline()
                    except psutil.Error:
                        cmd = []
                    is_server = bool(cmd) and self.server_predicate(cmd)
                    self._server_keys[key] = is_server
                    if is_server:
                        self.server_seen = True
                        self.server_cmdline = " ".join(cmd)[:300]
                if is_server and rss > self.peak_server_rss:
                    self.peak_server_rss = rss
            if self.roles:
                key = _proc_key(p)
                names = self._role_of.get(key)
                if names is None:
                    try:
                        cmd = p.cmdline()
                    except psutil.Error:
                        cmd = []
                    names = [n for n, pred in self.roles.items() if cmd and pred(cmd)]
                    self._role_of[key] = names
                for n in names:
                    if rss > self.peak_role_rss.get(n, 0):
                        self.peak_role_rss[n] = rss
        tmpfs = tmpfs_bytes({p.pid for p in procs}) if self.count_tmpfs else 0
        t = time.monotonic() - self.t_start
        with self._lock:
            self.peak_tmpfs = max(self.peak_tmpfs, tmpfs)
            self.peak_pss_plus_tmpfs = max(self.peak_pss_plus_tmpfs, pss_sum + tmpfs)
            self.samples += 1
            self.max_procs = max(self.max_procs, len(procs))
            if pss_sum > self.peak_pss:
                self.peak_pss = pss_sum
                self.peak_at_s = t
            self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
            if not self.timeline or t - self.timeline[-1][0] >= 1.0:
                self.timeline.append((round(t, 2), pss_sum, rss_sum))
        # Watchdogs.
        if self.killed_reason is None:
            # The cap applies to PSS plus the tree's tmpfs bytes, the memory the tree really holds: summed
            # RSS counts every shared library once per process (32 processes that import torch "use" 13 GiB
            # of RSS but 9 of PSS). Where a cgroup holds the tree the kernel enforces the cap first.
            hit = self._external_kill()
            if hit is not None:
                self.kill_tree(hit)
            elif self.mem_cap_gib is not None and pss_sum + tmpfs > self.mem_cap_gib * GiB:
                self.kill_tree(f"{oom_status(int(self.mem_cap_gib * GiB))} ({self.mechanism})")
            elif (
                self.min_available_gib is not None and psutil.virtual_memory().available < self.min_available_gib * GiB
            ):
                self.kill_tree(f"did not finish: machine memory available fell under {self.min_available_gib:g} GiB")
            elif self.timeout_s is not None and t > self.timeout_s:
                self.kill_tree(f"did not finish: timeout {self.timeout_s:g} s")

    def _external_kill(self) -> str | None:
        """The reason, when the cgroup's kernel OOM killer or the watchdog process stopped the tree."""
        if self.cgroup is not None and self.cgroup.oom_kills() > 0:
            how = f"cgroup v{self.cgroup.version} memory limit: the kernel killed a process of the tree"
            return f"{oom_status(self.cgroup.limit_bytes)} ({how})"
        if self.watchdog_reason_path:
            with contextlib.suppress(OSError):
                reason = open(self.watchdog_reason_path).read().strip()  # noqa: SIM115
                if reason:
                    return reason
        return None

    def kill_tree(self, reason: str) -> None:
        """SIGKILL every process of the tree, by PID (each checked against its start time)."""
        if self.killed_reason is None:
            self.killed_reason = reason
            if self.on_kill is not None:
                with contextlib.suppress(Exception):
                    self.on_kill(reason)
        for _ in range(3):
            procs = self._discover()
            if self._root is not None and _proc_key(self._root) not in {_proc_key(p) for p in procs}:
                try:
                    if self._root.is_running():
                        procs.append(self._root)
                except psutil.Error:
                    pass
            if not procs:
                return
            for p in procs:
                try:
                    if p.pid != os.getpid() and p.is_running():  # is_running checks the start time
                        p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    # -- thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.sample()
            except Exception as e:  # never let the sampler die silently mid-run
                print(f"[bench.measure] sampler error: {e!r}", file=sys.stderr)
            spent = time.monotonic() - t0
            # Reading PSS walks each process's page tables (tens of ms for a GiB-sized process):
            # keep the sampler under ~10% of one core, so it does not slow what it measures; but never
            # more than MAX_SAMPLE_GAP_S between samples (on a loaded machine a sample can take a second,
            # and 9 s gaps missed a whole 2.6 s round's peak). The gaps are reported (max_sample_gap_s).
            wait = max(self.interval - spent, min(9 * spent, MAX_SAMPLE_GAP_S), 0.01)
            self.max_gap = max(self.max_gap, spent + wait)
            self._stop.wait(wait)

    def start(self) -> TreeSampler:
        self.t_start = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def alive_procs(self) -> list[psutil.Process]:
        return [p for p in self._discover() if p.is_running()]

    @property
    def pss_source(self) -> str:
        """ "pss", "rss" (PSS was never readable) or "pss+rss" (read for some processes only)."""
        if self._n_rss_fallback == 0:
            return "pss"
        return "rss" if self._n_pss_read == 0 else "pss+rss"

    def result(self) -> dict[str, Any]:
        with self._lock:
            return {
                "peak_pss_bytes": self.peak_pss,
                "peak_pss_gib": round(self.peak_pss / GiB, 3),
                "peak_pss_source": self.pss_source,
                "peak_pss_at_s": None if self.peak_at_s is None else round(self.peak_at_s, 2),
                "peak_rss_sum_bytes": self.peak_rss_sum,
                "peak_server_rss_bytes": self.peak_server_rss if self.server_seen else None,
                "peak_server_rss_gib": round(self.peak_server_rss / GiB, 3) if self.server_seen else None,
                "server_cmdline": self.server_cmdline,
                "peak_role_rss_bytes": dict(self.peak_role_rss) if self.roles else None,
                "max_procs": self.max_procs,
                "samples": self.samples,
                "max_sample_gap_s": round(self.max_gap, 3),
                "sample_interval_s": self.interval,
                "mem_cap_gib": self.mem_cap_gib,
                "mem_cap_mechanism": self.mechanism,
                "cgroup_peak_bytes": self.cgroup.peak_bytes() if self.cgroup is not None else None,
                "peak_tmpfs_bytes": self.peak_tmpfs,
                "peak_pss_plus_tmpfs_bytes": self.peak_pss_plus_tmpfs,
                "peak_pss_plus_tmpfs_gib": round(self.peak_pss_plus_tmpfs / GiB, 3),
                "killed": self.killed_reason,
            }


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = 1800,
    mem_cap_gib: float | None = DEFAULT_MEM_CAP_GIB,
    min_available_gib: float | None = DEFAULT_MIN_AVAILABLE_GIB,
    server_predicate: CmdlinePredicate | None = None,
    interval: float = 0.075,
    stdout_path: str | None = None,
    stderr_path: str | None = None,
    nice: int | None = None,
    parse_json: bool = True,
    roles: dict[str, CmdlinePredicate] | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` under a :class:`TreeSampler`; return measurements and the command's outcome.

    stdout and stderr go to the given files (or to temporary files).  When ``parse_json``
    is true, the last JSON object line of stdout is returned under ``"output"``.
    ``t_launch`` (unix time, taken just before the process is started) lets callers relate
    the command's own timestamped events to its launch.
    """
    tag = uuid.uuid4().hex
    full_env = dict(os.environ if env is None else env)
    full_env[TAG_ENV] = tag
    # Files, not pipes: a process the command leaves behind keeps a pipe open, and reading it to
    # the end would wait for that process instead of the command.
    out_f = open(stdout_path, "w+b") if stdout_path else tempfile.TemporaryFile()  # noqa: SIM115
    err_f = open(stderr_path, "w+b") if stderr_path else tempfile.TemporaryFile()  # noqa: SIM115

    cap_bytes = int(mem_cap_gib * GiB) if mem_cap_gib is not None else None
    cgroup = MemoryCgroup.create(cap_bytes, f"fl-bench-{tag}") if cap_bytes is not None else None

    def preexec() -> None:
        if cgroup is not None:
            cgroup.join()  # before exec: nothing of the tree ever runs outside the limit
        if nice:
            os.nice(nice)

    t_launch = time.time()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        env=full_env,
        cwd=cwd,
        stdout=out_f,
        stderr=err_f,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec if (nice or cgroup is not None) else None,
    )
    watchdog = reason_path = None
    if cgroup is None and mem_cap_gib is not None:
        reason_path = os.path.join(tempfile.gettempdir(), f"fl-bench-watchdog-{tag}")
        watchdog = start_watchdog(proc.pid, mem_cap_gib, tag, reason_path)
    sampler = TreeSampler(
        proc.pid,
        interval=interval,
        server_predicate=server_predicate,
        mem_cap_gib=mem_cap_gib,
        min_available_gib=min_available_gib,
        timeout_s=timeout_s,
        tag=tag,
        roles=roles,
        cgroup=cgroup,
        watchdog_reason_path=reason_path,
        mechanism=f"cgroup v{cgroup.version} memory limit" if cgroup is not None else "PSS+tmpfs sampler",
    ).start()
    try:
        proc.wait()
    except BaseException:
        sampler.kill_tree("did not finish: interrupted")
        raise
    finally:
        wall = time.monotonic() - t0
        # Leftovers (daemons the command left behind) belong to the tree: end them too.
        time.sleep(0.2)
        leftovers = sampler.alive_procs()
        sampler.stop()
        if leftovers:
            sampler_killed = sampler.killed_reason
            sampler.kill_tree("leftover processes")
            sampler.killed_reason = sampler_killed
        if sampler.killed_reason is None:
            sampler.killed_reason = sampler._external_kill()  # an OOM kill the last sample did not see
        memory = sampler.result()
        if watchdog is not None:
            memory["mem_cap_mechanism"] = "RSS watchdog process (every 20 ms) and the PSS+tmpfs sampler"
        if cgroup is not None:
            cgroup.close()
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        if reason_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(reason_path)
    out_f.seek(0)
    stdout = out_f.read().decode(errors="replace")
    out_f.close()
    err_f.seek(0, os.SEEK_END)
    err_f.seek(max(0, err_f.tell() - 20000))
    stderr = err_f.read().decode(errors="replace")
    err_f.close()
    res: dict[str, Any] = {
        "cmd": list(cmd),
        "t_launch": t_launch,
        "wall_s": round(wall, 3),
        "returncode": proc.returncode,
        "leftover_procs_killed": len(leftovers),
        **memory,
    }
    if sampler.killed_reason:
        res["status"] = sampler.killed_reason
    elif proc.returncode == 0:
        res["status"] = "ok"
    else:
        res["status"] = f"failed: exit code {proc.returncode}"
    if parse_json:
        res["output"] = _last_json_line(stdout)
    res["stdout_tail"] = stdout[-2000:]
    res["stderr_tail"] = stderr[-4000:]
    return res


def _main(argv: list[str] | None = None) -> int:
    import argparse

    if argv is None and len(sys.argv) == 6 and sys.argv[1] == "--watchdog":
        return _watchdog_main(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5])
    ap = argparse.ArgumentParser(description="Run a command under the tree sampler; print one JSON line.")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--mem-cap-gib", type=float, default=DEFAULT_MEM_CAP_GIB)
    ap.add_argument("--server-match", default=None, help="substring of the server process's cmdline")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    pred = cmdline_contains(a.server_match) if a.server_match else None
    r = run_measured(cmd, timeout_s=a.timeout, mem_cap_gib=a.mem_cap_gib, server_predicate=pred)
    r.pop("stdout_tail", None)
    print(json.dumps(r))
    return 0 if r["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(_main())
