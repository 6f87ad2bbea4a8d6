"""The cost of idle simulated sites: register N sites in the simulator's server and sites host (no
job), then report the registration time and, over an idle window, the tree's PSS, threads and CPU.

    PYTHONPATH=$PWD python -m bench.sim_idle 200 1000 [--idle 20]

Each count runs in a fresh process (the measured tree is that process, the server's, and its sites
hosts), one JSON line per count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _pss_and_threads(procs: list[psutil.Process]) -> tuple[int, int]:
    pss = threads = 0
    for proc in procs:
        try:
            pss += proc.memory_full_info().pss
            threads += proc.num_threads()
        except psutil.Error:
            pass
    return pss, threads


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def measure(count: int, idle: float) -> dict[str, Any]:
    """Register ``count`` sites as the simulator does, then measure ``idle`` seconds of nothing."""
    from fl.log import setup_logging
    from fl.simulator import _sim_server, _SitesHost

    setup_logging()
    sites = [f"site-{i}" for i in range(1, count + 1)]
    with tempfile.TemporaryDirectory(prefix="fl-sim-idle-") as tmp:
        workspace = Path(tmp)
        server = _sim_server(workspace / "server", len(sites), None, 30.0)
        port = server.start()
        host = _SitesHost(f"127.0.0.1:{port}", workspace, sites, None)
        started = time.monotonic()
        try:
            host.start()
            problem = host.wait_registered(server, 600.0)
            registered_s = time.monotonic() - started
            if problem:
                return {"sites": count, "error": problem}
            time.sleep(3.0)  # let the last registrations settle
            procs = _tree()
            cpu0, t0 = _cpu_seconds(procs), time.monotonic()
            time.sleep(idle)
            cpu1, t1 = _cpu_seconds(procs), time.monotonic()
            pss, threads = _pss_and_threads(_tree())
            return {
                "sites": count,
                "registered_s": round(registered_s, 1),
                "processes": len(procs),
                "pss_mib": round(pss / 2**20, 1),
                "threads": threads,
                "idle_cpu_per_s": round((cpu1 - cpu0) / (t1 - t0), 3),
                "connected_after_idle": len(server.registry.connected_sites()),
            }
        finally:
            host.stop(graceful=False)
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_idle")
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle measured")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.counts[0], args.idle)), flush=True)
        return 0
    for count in args.counts:
        out = subprocess.run(
            [sys.executable, "-m", "bench.sim_idle", str(count), "--idle", str(args.idle), "--one"],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"sites": count, "error": out.stderr[-2000:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
