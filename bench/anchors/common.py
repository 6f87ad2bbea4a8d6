"""Scenario plumbing shared by the anchors' scripts (standard library and psutil only).

* timestamped events that the client code appends to a file (``FL_BENCH_EVENTS``), and their
  summary: time from launch to the first training step, seconds per round;
* the driver: each scenario script re-runs itself with ``--inner`` under
  :func:`bench.measure.run_measured`, so the memory it reports is the framework's tree alone,
  then prints one JSON line;
* workspaces under ``/tmp/fl-bench-*``, removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import measure  # noqa: E402

EVENTS_ENV = "FL_BENCH_EVENTS"
RESULT_ENV = "FL_BENCH_RESULT"
GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------------------------
def emit(kind: str, **fields: Any) -> None:
    """Append one event line ``{"t": unix time, "kind": ..., **fields}`` to $FL_BENCH_EVENTS.

    One ``write`` of one short line on an O_APPEND descriptor, so lines from many processes
    and threads do not interleave.
    """
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    rec = {"t": time.time(), "kind": kind, "pid": os.getpid(), **fields}
    line = (json.dumps(rec) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
    except OSError:
        pass
    out.sort(key=lambda e: e["t"])
    return out


def summarize_events(events: list[dict[str, Any]], t_launch: float, rounds: int) -> dict[str, Any]:
    """Derive the timing figures from the client events.

    * ``time_to_first_step_s``: launch -> the first ``first_step`` event of round 0 (the moment
      a site is about to run its first optimizer step; in scenarios without training, the
      first ``received`` of round 0);
    * ``round_seconds[r]`` = earliest ``received`` of round r+1 - earliest ``received`` of
      round r, i.e. a whole cycle: local work, upload, aggregation, download of the next model;
      the last round, which has no next one, is ``last_sent`` of the last round - earliest
      ``received`` of it (no aggregation counted) and is reported apart;
    * ``seconds_per_round``: mean of the full cycles after the first (steady state; the first is
      ``first_cycle_seconds``) when there are two or more, else the one cycle, else the last round;
    * ``framework_seconds_per_round``: the same cycles less the slowest site's own work.
    """
    by_kind: dict[str, dict[int, list[float]]] = {}
    for e in events:
        if "round" not in e:
            continue
        by_kind.setdefault(e["kind"], {}).setdefault(int(e["round"]), []).append(e["t"])
    recv = {r: min(ts) for r, ts in by_kind.get("received", {}).items()}
    sent_last = {r: max(ts) for r, ts in by_kind.get("sent", {}).items()}
    first_step = {r: min(ts) for r, ts in by_kind.get("first_step", {}).items()}
    res: dict[str, Any] = {"rounds_seen": sorted(recv)}
    starts = [e["t"] for e in events if e["kind"] == "client_start"]
    if starts:
        res["time_to_client_start_s"] = round(min(starts) - t_launch, 3)
    if 0 in recv:
        res["time_to_first_model_s"] = round(recv[0] - t_launch, 3)
    t0 = first_step.get(0, recv.get(0))
    res["time_to_first_step_s"] = None if t0 is None else round(t0 - t_launch, 3)
    cycles = [round(recv[r + 1] - recv[r], 3) for r in range(rounds - 1) if r in recv and r + 1 in recv]
    res["round_seconds"] = cycles
    last = rounds - 1
    if last in recv and last in sent_last:
        res["last_round_client_seconds"] = round(sent_last[last] - recv[last], 3)
    # The sites' own work per round (slowest site: received -> sent); the rest of a cycle is the
    # framework's: aggregation, persistence, moving models.
    sent_by_site: dict[tuple[int, str], float] = {}
    recv_by_site: dict[tuple[int, str], float] = {}
    for e in events:
        if "round" in e and "site" in e and e["kind"] in ("received", "sent"):
            key = (int(e["round"]), str(e["site"]))
            (recv_by_site if e["kind"] == "received" else sent_by_site)[key] = e["t"]
    client = {}
    for (r, site), t_sent in sent_by_site.items():
        if (r, site) in recv_by_site:
            client[r] = max(client.get(r, 0.0), t_sent - recv_by_site[(r, site)])
    framework = [
        recv[r + 1] - recv[r] - client[r] for r in range(rounds - 1) if r in recv and r + 1 in recv and r in client
    ]
    if len(framework) >= 2:
        framework = framework[1:]  # steady state, like seconds_per_round below
    if framework:
        res["framework_seconds_per_round"] = round(sum(framework) / len(framework), 3)
    if len(cycles) >= 2:
        # Steady state: the first cycle also holds the sites' start-up skew and first-touch costs,
        # reported apart.
        res["first_cycle_seconds"] = cycles[0]
        res["seconds_per_round"] = round(sum(cycles[1:]) / len(cycles[1:]), 3)
    elif cycles:
        res["seconds_per_round"] = cycles[0]
    else:
        res["seconds_per_round"] = res.get("last_round_client_seconds")
    res["events"] = len(events)
    return res


# --------------------------------------------------------------------------------------------
# workspaces and results
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def workspace(tag: str, keep: bool = False) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"fl-bench-{tag}-", dir="/tmp"))
    try:
        yield d
    finally:
        if keep:
            print(f"[bench] kept workspace {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


def write_result(**fields: Any) -> None:
    """From inside the framework (server side or the inner main): merge fields into $FL_BENCH_RESULT."""
    path = os.environ.get(RESULT_ENV)
    if not path:
        return
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(Path(path).read_text())
    data.update(fields)
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


def read_result(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def versions(*dists: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for d in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            out[d] = md.version(d)
    out["python"] = sys.version.split()[0]
    return out


# The scenarios' parameters, the same for every anchor (and for fl).
SCENARIOS: dict[str, dict[str, Any]] = {
    # hello-pt's CNN, 64 training samples per site, hello-pt's tutorial hyperparameters.
    "overhead": {
        "sites": 2,
        "rounds": 5,
        "train_size": 64,
        "val_size": 0,
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.001,
        "momentum": 0.9,
    },
    # One float32 tensor of `mib` MiB; each site returns params + 1, no training.
    "large": {"sites": 2, "rounds": 2, "mib": 100},
    # The same CNN, a little training per site (16 samples: 4 steps), many sites.
    "scale": {
        "sites": 2,
        "rounds": 2,
        "train_size": 16,
        "val_size": 0,
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.001,
        "momentum": 0.9,
    },
    # hello-pt on the offline dataset with jobs/hello-pt's settings for it (2000 training and 500
    # validation samples per site, 2 epochs, batch 16, lr 0.02); the final global model is
    # evaluated on each site's validation ("test") split.
    "train": {
        "sites": 2,
        "rounds": 2,
        "train_size": 2000,
        "val_size": 500,
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.02,
        "momentum": 0.9,
    },
}


def base_parser(description: str, scenario: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    if scenario is not None:
        for key, default in SCENARIOS[scenario].items():
            ap.add_argument(f"--{key.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the run is killed")
    ap.add_argument(
        "--mem-cap-gib",
        type=float,
        default=measure.DEFAULT_MEM_CAP_GIB,
        help="memory cap of the tree (GiB): a cgroup limit where possible, else PSS+tmpfs and an RSS watchdog",
    )
    ap.add_argument("--keep", action="store_true", help="keep the /tmp/fl-bench-* workspace")
    ap.add_argument("--log", default=None, help="file for the framework's own output (default: stderr)")
    return ap


def drive(
    *,
    anchor: str,
    scenario: str,
    script: str,
    args: argparse.Namespace,
    argv: Sequence[str],
    params: dict[str, Any],
    rounds: int,
    server_predicate: Callable[[Sequence[str]], bool] | None,
    extra_env: dict[str, str] | None = None,
    post: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None,
    framework_dists: Sequence[str] = (),
    command: Callable[[Path], list[str]] | None = None,
    setup: Callable[[Path, dict[str, str]], None] | None = None,
    roles: dict[str, Callable[[Sequence[str]], bool]] | None = None,
) -> dict[str, Any]:
    """Run ``script --inner argv...`` (or ``command(workspace)``) measured, then merge events,
    results and measurements.  ``setup(workspace, env)`` may prepare files and environment."""
    with workspace(f"{anchor}-{scenario}", keep=args.keep) as ws:
        events = ws / "events.jsonl"
        result = ws / "result.json"
        env = dict(os.environ)
        env[EVENTS_ENV] = str(events)
        env[RESULT_ENV] = str(result)
        pp = [str(REPO_ROOT), str(Path(script).resolve().parent)]
        if env.get("PYTHONPATH"):
            pp.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pp)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Sites train side by side on a 2-core machine: one torch/OpenMP thread per process
        # for every framework (Ray already gives Flower's actors 1; FLARE would take one per
        # core in each process and oversubscribe).  FL_BENCH_TORCH_THREADS changes it.
        threads = os.environ.get("FL_BENCH_TORCH_THREADS", "1")
        env["OMP_NUM_THREADS"] = threads
        env["MKL_NUM_THREADS"] = threads
        env.update(extra_env or {})
        if setup is not None:
            setup(ws, env)
        log_path = args.log or str(ws / "framework.log")
        inner_cmd = [sys.executable, script, "--inner", "--workdir", str(ws), *argv]
        cmd = command(ws) if command is not None else inner_cmd
        load_before = os.getloadavg()
        m = measure.run_measured(
            cmd,
            env=env,
            cwd=str(ws),
            timeout_s=args.timeout,
            mem_cap_gib=args.mem_cap_gib,
            server_predicate=server_predicate,
            stdout_path=str(ws / "inner.stdout"),
            stderr_path=log_path,
            parse_json=False,
            roles=roles,
        )
        ev = read_events(events)
        inner = read_result(result)
        out: dict[str, Any] = {
            "anchor": anchor,
            "scenario": scenario,
            "status": m["status"],
            "versions": versions(*framework_dists, "torch", "numpy"),
            "params": params,
            "wall_s": m["wall_s"],
            "peak_pss_bytes": m["peak_pss_bytes"],
            "peak_pss_gib": m["peak_pss_gib"],
            "peak_pss_source": m["peak_pss_source"],
            "peak_rss_sum_bytes": m["peak_rss_sum_bytes"],
            "peak_server_rss_bytes": m["peak_server_rss_bytes"],
            "peak_server_rss_gib": m["peak_server_rss_gib"],
            "server_process": m["server_cmdline"],
            "peak_role_rss_bytes": m.get("peak_role_rss_bytes"),
            "max_procs": m["max_procs"],
            "mem_cap_gib": m["mem_cap_gib"],
            "mem_cap_mechanism": m["mem_cap_mechanism"],
            # fl's simulator keeps models in /dev/shm during a round: counted beside PSS (bench/measure.py)
            "peak_tmpfs_bytes": m["peak_tmpfs_bytes"],
            "peak_pss_plus_tmpfs_bytes": m["peak_pss_plus_tmpfs_bytes"],
            "peak_pss_plus_tmpfs_gib": m["peak_pss_plus_tmpfs_gib"],
            "cgroup_peak_bytes": m["cgroup_peak_bytes"],
            "cgroup_peak_gib": None if m["cgroup_peak_bytes"] is None else round(m["cgroup_peak_bytes"] / GiB, 3),
            "samples": m["samples"],
            "max_sample_gap_s": m["max_sample_gap_s"],
            "torch_threads_per_process": int(threads),
            # The machine is shared: the 1-minute load average before and after, for context.
            "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
        out.update(summarize_events(ev, m["t_launch"], rounds))
        out.update(inner)
        if post is not None and m["status"] == "ok":
            try:
                out.update(post(ws, out))
            except Exception as e:  # a failed check is a result, not a crash
                out["post_error"] = repr(e)
        if m["status"] != "ok":
            tail = m.get("stderr_tail", "")
            if not tail:
                with contextlib.suppress(OSError):
                    tail = Path(log_path).read_text(errors="replace")[-4000:]
            out["error_tail"] = (m.get("stdout_tail", "")[-1000:] + "\n" + tail[-3000:]).strip()
        if args.keep:
            out["workspace"] = str(ws)
        return out


def add_throughput(out: dict[str, Any], sites: int, mib: int) -> None:
    """Large scenario: bytes the server sends (the model to each site) plus receives (each site's
    result) per round, over seconds per round."""
    moved = 2 * sites * mib * MiB
    out["bytes_moved_per_round"] = moved
    spr = out.get("seconds_per_round")
    out["effective_gb_per_s"] = round(moved / spr / 1e9, 3) if spr else None


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()
