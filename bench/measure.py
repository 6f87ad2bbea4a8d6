"""Shared measurement code: follow a process tree's memory, time it, and guard the machine.

:class:`TreeSampler` polls a process tree (the root and every descendant, plus any process that
was once seen in the tree and got re-parented, plus strays that carry the tree's tag in their
environment) every ``interval`` seconds with psutil and records:

* peak summed PSS of the tree (falls back to RSS, per process, when PSS cannot be read; the
  result says which),
* peak summed RSS of the tree,
* peak RSS of a chosen process (e.g. the FL server), picked by a predicate on its cmdline,
* peak RSS per named role (``roles``: name -> cmdline predicate; the largest matching process),
* the largest number of processes seen at once.

A memory watchdog kills the whole tree it launched (only those PIDs, one by one, each checked
against its start time) when summed RSS passes a cap (default 14 GiB; env ``FL_BENCH_MEM_CAP_GIB``)
or when the machine's available memory falls under a floor, and the result then says
``"did not finish: memory cap N GiB reached"``.  A timeout does the same with
``"did not finish: timeout N s"``.

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
from typing import Any

import psutil

GiB = 1024**3
MiB = 1024**2
DEFAULT_MEM_CAP_GIB = float(os.environ.get("FL_BENCH_MEM_CAP_GIB", "14"))
# Kill the tree too if the machine as a whole runs this low (it is shared).
DEFAULT_MIN_AVAILABLE_GIB = float(os.environ.get("FL_BENCH_MIN_AVAILABLE_GIB", "1.5"))
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
    ) -> None:
        self.root_pid = root_pid
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
        t = time.monotonic() - self.t_start
        with self._lock:
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
            # The cap applies to PSS, the memory the tree really holds: summed RSS counts every shared
            # library once per process (32 processes that import torch "use" 13 GiB of RSS but 9 of PSS).
            if self.mem_cap_gib is not None and pss_sum > self.mem_cap_gib * GiB:
                self.kill_tree(f"did not finish: memory cap {self.mem_cap_gib:g} GiB reached")
            elif (
                self.min_available_gib is not None and psutil.virtual_memory().available < self.min_available_gib * GiB
            ):
                self.kill_tree(f"did not finish: machine memory available fell under {self.min_available_gib:g} GiB")
            elif self.timeout_s is not None and t > self.timeout_s:
                self.kill_tree(f"did not finish: timeout {self.timeout_s:g} s")

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
            # keep the sampler under ~10% of one core, so it does not slow what it measures.
            self._stop.wait(max(self.interval - spent, 9 * spent, 0.01))

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
                "sample_interval_s": self.interval,
                "mem_cap_gib": self.mem_cap_gib,
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

    def preexec() -> None:
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
        preexec_fn=preexec if nice else None,
    )
    sampler = TreeSampler(
        proc.pid,
        interval=interval,
        server_predicate=server_predicate,
        mem_cap_gib=mem_cap_gib,
        min_available_gib=min_available_gib,
        timeout_s=timeout_s,
        tag=tag,
        roles=roles,
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
        **sampler.result(),
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
