"""The benchmark: fl side by side with NVIDIA FLARE and Flower, on the same work, in the same run.

    python -m bench                                   # every scenario (hours on 2 cores: 1000 sites, 1 GiB)
    python -m bench --quick                           # 100 MiB, 2 and 32 sites: minutes
    python -m bench --scenarios scale                 # only the scale scenario (--scale-sites 2,32,256,1000)
    python -m bench --scenarios large                 # only the large one (--large-mib 100,1024), with its floor
    python -m bench --time-limit scale=1800 --time-limit large=900     # per-scenario time limits (seconds)
    python -m bench --anchors ""                      # fl alone

Each scenario runs for fl and then for each anchor, back to back (anchors in their own cached
virtual environments, bench/envs.py), each under the same process-tree sampler and memory cap
(bench/measure.py: peak PSS plus fl's tmpfs bytes, a cgroup memory limit where the machine allows).
The large scenario's loopback floor (bench/loopback.py: median of runs into fresh memory, at the
model's size) is measured in the same run, right before it. Prints a table of absolute figures and
fl's ratios, every target of the issue with its verdict and reason, and writes both (JSON and
Markdown) to bench/results/ with the machine's description, the date and the load average.

Scenarios (bench/anchors/README.md has the details of each framework's side):
  overhead  hello-pt's CNN, 64 samples per site, 2 sites, 5 rounds (fl's export counted, as everywhere)
  large     one float32 tensor of 100 MiB and of 1 GiB, sites return params + 1, 2 sites, 2 rounds;
            fl also with FedAdam and FedMedian; FLARE also with one client process and with its
            large-model options (ExchangeFormat.PYTORCH, tensor disk offload)
  scale     the CNN, 16 samples per site, 2, 32, 256 and 1000 sites, 2 rounds; Flower with its own
            concurrency defaults and with one CPU per ClientApp
  train     hello-pt on the offline dataset, 2 sites, 2 rounds; plus a plain PyTorch FedAvg loop

A run that does not finish (time limit, memory cap, error) is a row with its reason, never dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import loopback  # noqa: E402
from bench.anchors.run_all import run_anchor  # noqa: E402

GiB = 1024**3
MiB = 1024**2


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_fl(scenario: str, extra: list[str], timeout: float) -> dict[str, Any]:
    script = HERE / "fl_side" / f"{scenario}.py"
    cmd = ["nice", "-n", "10", sys.executable, str(script), "--timeout", str(timeout), *extra]
    return _json_line(cmd, timeout, {"anchor": "fl", "scenario": scenario, "args": extra})


#: Seconds a scenario's run may take (each framework's, each variant's), unless --time-limit says otherwise.
TIME_LIMITS_S = {"overhead": 600.0, "large": 1200.0, "scale": 1800.0, "train": 900.0}
SCALE_SITES = ["2", "32", "256", "1000"]
QUICK_SCALE_SITES = ["2", "32"]
LARGE_MIB = ["100", "1024"]
QUICK_LARGE_MIB = ["100"]
#: fl's algorithms beside FedAvg in the large scenario (issue 11: seconds per round, server peak RSS).
LARGE_WORKFLOWS = ["FedAdam", "FedMedian"]


def run_plain(timeout: float) -> dict[str, Any]:
    cmd = ["nice", "-n", "10", sys.executable, "-m", "bench.plain"]
    return _json_line(cmd, timeout, {"anchor": "plain-pytorch", "scenario": "train"})


def _json_line(cmd: list[str], timeout: float, identity: dict[str, Any]) -> dict[str, Any]:
    print(f"[bench] {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, timeout=timeout + 300
        )
    except subprocess.TimeoutExpired:
        return {**identity, "status": f"did not finish: timeout {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return {**identity, **json.loads(line)}
            except ValueError:
                break
    return {
        **identity,
        "status": f"failed: exit code {proc.returncode}, no JSON line",
        "wall_s": round(time.monotonic() - started, 1),
    }


# ------------------------------------------------------------------------------------------------ plan
def plan(scenarios: list[str], scale_sites: list[str], large_mib: list[str]) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = []
    for scenario in scenarios:
        if scenario == "large":
            runs += [("large", ["--mib", m]) for m in large_mib]
        elif scenario == "scale":
            runs += [("scale", ["--sites", n]) for n in scale_sites]
        else:
            runs.append((scenario, []))
    return runs


def anchor_variants(anchor: str, scenario: str, extra: list[str]) -> list[list[str]]:
    """The argument lists an anchor runs a scenario with: its main row first, then the configurations
    that let it finish where its defaults do not, or that it offers for the case (its own options)."""
    if anchor == "flower" and scenario == "scale":
        # Its own defaults for concurrency first (the issue's row), then one CPU per ClientApp (two
        # ClientApps at once on 2 cores): the faster one that finishes is what fl is held to.
        return [["--client-cpus", "0"], ["--client-cpus", "1"]]
    if anchor == "nvflare" and scenario == "large" and extra == ["--mib", "1024"]:
        # Defaults (a worker process per site) run out of memory here; one worker finishes; and FLARE's
        # own large-model options (ExchangeFormat.PYTORCH, tensor disk offload), with each.
        return [[], ["--threads", "1"], ["--large-model-options"], ["--large-model-options", "--threads", "1"]]
    if anchor == "nvflare" and scenario == "scale" and extra == ["--sites", "32"]:
        return [[], ["--threads", "8"]]  # the default (32 worker processes) ran out of memory before
    return [[]]


def fl_variants(scenario: str) -> list[list[str]]:
    """fl's rows of a scenario: FedAvg first, then the large scenario's other algorithms."""
    if scenario == "large":
        return [[], *[["--workflow", w] for w in LARGE_WORKFLOWS]]
    return [[]]


# ------------------------------------------------------------------------------------------------ report
def _ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("status") == "ok" and (r.get("final_check") or {}).get("exact") is not False


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _label(scenario: str, args: list[str]) -> str:
    return f"{scenario} {' '.join(args)}".strip()


def _best_anchor(results: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The anchor result with the smallest ``key`` among those that finished."""
    done = [r for r in results if r.get("anchor") not in ("fl", "plain-pytorch") and _ok(r) and r.get(key)]
    return min(done, key=lambda r: r[key]) if done else None


def evaluate_targets(by_run: dict[str, list[dict[str, Any]]], loop: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmark issue, with the figures behind it and whether it holds."""
    targets: list[dict[str, Any]] = []

    def fl_of(label: str) -> dict[str, Any] | None:
        """fl's main row (FedAvg, no variant arguments)."""
        return next((r for r in by_run.get(label, []) if r.get("anchor") == "fl" and not r.get("extra")), None)

    if "overhead" in by_run:
        fl = fl_of("overhead")
        best = _best_anchor(by_run["overhead"], "wall_s")
        if fl and _ok(fl) and best:
            ratio = fl["wall_s"] / best["wall_s"]
            targets.append({
                "target": "overhead: fl wall time <= 1/3 of the faster anchor's",
                "holds": ratio <= 1 / 3,
                "figures": f"fl {fl['wall_s']:.1f} s vs {best['anchor']} {best['wall_s']:.1f} s: {ratio:.2f}x",
            })  # fmt: skip
        if fl and _ok(fl) and fl.get("framework_seconds_per_round") is not None:
            targets.append({
                "target": "overhead: under 0.5 s of framework time per round",
                "holds": fl["framework_seconds_per_round"] < 0.5,
                "figures": f"{fl['framework_seconds_per_round']:.3f} s (round minus the sites' own work)",
            })  # fmt: skip
    for label in [k for k in by_run if k.startswith("large")]:
        fl = fl_of(label)
        if not (fl and _ok(fl)):
            targets.append({"target": f"{label}: fl finishes with exact values", "holds": False, "figures": str(fl)})
            continue
        best = _best_anchor(by_run[label], "seconds_per_round")
        if best:
            speedup = best["seconds_per_round"] / fl["seconds_per_round"]
            targets.append({
                "target": f"{label}: fl at least 5x faster per round than the faster anchor that finishes",
                "holds": speedup >= 5,
                "figures": f"fl {fl['seconds_per_round']:.2f} s vs {best['anchor']} {best['seconds_per_round']:.2f} s: "
                f"{speedup:.1f}x",
            })  # fmt: skip
        elif any(r.get("anchor") != "fl" for r in by_run[label]):  # anchors ran and none finished
            targets.append({
                "target": f"{label}: fl at least 5x faster per round than the faster anchor that finishes",
                "holds": True,
                "figures": f"no anchor finished; fl {fl['seconds_per_round']:.2f} s per round",
            })  # fmt: skip
        floor = (loop.get("by_label") or {}).get(label, loop)
        if floor.get("gb_per_s") and fl.get("bytes_moved_per_round"):
            limit = fl["bytes_moved_per_round"] / (floor["gb_per_s"] * 1e9)
            ratio = fl["seconds_per_round"] / limit
            how = " (median into fresh memory, this run)" if floor.get("fresh_memory") else ""
            targets.append({
                "target": f"{label}: fl within 3x of the loopback limit",
                "holds": ratio <= 3,
                "figures": f"{fl['seconds_per_round']:.2f} s per round vs {limit:.2f} s to copy the same bytes over "
                f"loopback TCP{how}: {ratio:.1f}x",
            })  # fmt: skip
        mib = int(fl["params"]["mib"])
        rss = fl.get("peak_server_rss_bytes") or 0
        targets.append({
            "target": f"{label}: server peak RSS under 3x the model",
            "holds": rss < 3 * mib * MiB,
            "figures": f"{rss / GiB:.2f} GiB for a {mib} MiB model: {rss / (mib * MiB):.2f}x",
        })  # fmt: skip
        if mib == 1024:
            targets += large_model_memory_targets(label, fl, mib * MiB)
    scale = {int(r["params"]["sites"]): r for k, rs in by_run.items() if k.startswith("scale") for r in rs
             if r.get("anchor") == "fl" and _ok(r)}  # fmt: skip
    targets += scale_targets(by_run)
    if len(scale) >= 2:
        lo, hi = min(scale), max(scale)
        growth = scale[hi]["seconds_per_round"] / scale[lo]["seconds_per_round"]
        targets.append({
            "target": f"scale: seconds per round from {lo} to {hi} sites grow no faster than the bytes moved",
            "holds": growth <= hi / lo,
            "figures": f"{scale[lo]['seconds_per_round']:.2f} s -> {scale[hi]['seconds_per_round']:.2f} s: "
            f"{growth:.1f}x for {hi / lo:.0f}x the bytes",
        })  # fmt: skip
    if "train" in by_run:
        fl = fl_of("train")
        plain = next((r for r in by_run["train"] if r.get("anchor") == "plain-pytorch"), None)
        if fl and _ok(fl) and plain and _ok(plain):
            diff = abs(fl["final_accuracy"] - plain["final_accuracy"])
            targets.append({
                "target": "train: fl's accuracy equals a plain PyTorch FedAvg loop's within noise (0.02)",
                "holds": diff <= 0.02,
                "figures": f"fl {fl['final_accuracy']:.3f} vs plain {plain['final_accuracy']:.3f}",
            })  # fmt: skip
    return targets


def large_model_memory_targets(label: str, fl: dict[str, Any], model_bytes: int) -> list[dict[str, Any]]:
    """Issue 13's memory targets at 1 GiB: server peak RSS under 1.5x the model, fl's tmpfs bytes at
    most 2x the model at any time (the sampler's peak of fl's /dev/shm bytes)."""
    rss = fl.get("peak_server_rss_bytes") or 0
    tmpfs = fl.get("peak_tmpfs_bytes")
    out = [{
        "target": f"{label}: server peak RSS under 1.5x the model",
        "holds": rss < 1.5 * model_bytes,
        "figures": f"{rss / GiB:.2f} GiB: {rss / model_bytes:.2f}x",
    }]  # fmt: skip
    if tmpfs is None:
        out.append({"target": f"{label}: fl's tmpfs bytes at most 2x the model at any time", "holds": False,
                    "figures": "tmpfs bytes were not sampled (an older bench/measure.py)"})  # fmt: skip
    else:
        out.append({
            "target": f"{label}: fl's tmpfs bytes at most 2x the model at any time",
            "holds": tmpfs <= 2 * model_bytes,
            "figures": f"peak {tmpfs / GiB:.2f} GiB in /dev/shm: {tmpfs / model_bytes:.2f}x",
        })  # fmt: skip
    return out


def _scale_row(by_run: dict[str, list[dict[str, Any]]], sites: int, anchor: str) -> list[dict[str, Any]]:
    return [r for r in by_run.get(f"scale --sites {sites}", []) if r.get("anchor") == anchor]


def scale_targets(by_run: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Issue 13's scale targets: 1000 sites under 3 GiB of PSS plus tmpfs; at 256 sites fl's wall time and
    seconds per round at most half of Flower's (its faster configuration that finished, per figure)."""
    out: list[dict[str, Any]] = []
    for fl in _scale_row(by_run, 1000, "fl")[:1]:
        peak = fl.get("peak_pss_plus_tmpfs_bytes") or fl.get("peak_pss_bytes") or 0
        done = _ok(fl)
        out.append({
            "target": "scale 1000 sites: fl finishes with peak PSS + tmpfs of the tree under 3 GiB",
            "holds": done and peak < 3 * GiB,
            "figures": f"peak {peak / GiB:.2f} GiB (PSS + fl's tmpfs), wall {_fmt(fl.get('wall_s'), ' s', 1)}"
            if done else f"fl did not finish: {fl.get('status')} (peak {peak / GiB:.2f} GiB when it stopped)",
        })  # fmt: skip
    fl_rows = _scale_row(by_run, 256, "fl")[:1]
    flower = _scale_row(by_run, 256, "flower")
    if fl_rows and flower:
        fl = fl_rows[0]
        name = "scale 256 sites: fl's wall time and seconds per round at most 1/2 of Flower's"
        done = [r for r in flower if _ok(r)]
        if not _ok(fl):
            out.append({"target": name, "holds": False, "figures": f"fl did not finish: {fl.get('status')}"})
        elif not done:
            reasons = "; ".join(str(r.get("status")) for r in flower)
            out.append({"target": name, "holds": True, "figures": f"Flower did not finish ({reasons})"})
        else:
            parts, holds = [], True
            for key, unit in (("wall_s", "s wall"), ("seconds_per_round", "s per round")):
                best = min((r for r in done if r.get(key)), key=lambda r: r[key], default=None)
                if best is None or not fl.get(key):
                    holds = False
                    parts.append(f"{unit}: not measured")
                    continue
                ratio = fl[key] / best[key]
                holds = holds and ratio <= 0.5
                how = " ".join(best.get("extra") or []) or "defaults"
                parts.append(f"{unit}: fl {fl[key]:.2f} vs Flower ({how}) {best[key]:.2f}: {ratio:.2f}x")
            out.append({"target": name, "holds": holds, "figures": "; ".join(parts)})
    return out


#: Every target of issue 13 (and the earlier ones the bench kept), in the order they are printed; a
#: target whose scenario did not run is printed as not measured.
ISSUE_TARGETS = [
    ("scale 1000 sites: fl finishes with peak PSS + tmpfs of the tree under 3 GiB", "scale --sites 1000"),
    ("scale 256 sites: fl's wall time and seconds per round at most 1/2 of Flower's", "scale --sites 256"),
    ("large --mib 1024: fl at least 5x faster per round than the faster anchor that finishes", "large --mib 1024"),
    ("large --mib 1024: fl within 3x of the loopback limit", "large --mib 1024"),
    ("large --mib 1024: server peak RSS under 1.5x the model", "large --mib 1024"),
    ("large --mib 1024: fl's tmpfs bytes at most 2x the model at any time", "large --mib 1024"),
    ("overhead: fl wall time <= 1/3 of the faster anchor's", "overhead"),
]


def with_unmeasured(targets: list[dict[str, Any]], by_run: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``targets`` plus each issue target that has no verdict, with the reason (``holds`` None)."""
    have = {t["target"] for t in targets}
    out = list(targets)
    for name, label in ISSUE_TARGETS:
        if name in have:
            continue
        fl = next((r for r in by_run.get(label, []) if r.get("anchor") == "fl" and not r.get("extra")), None)
        if fl is not None and not _ok(fl):
            out.append({"target": name, "holds": False, "figures": f"fl did not finish: {fl.get('status')}"})
            continue
        if label not in by_run:
            why = f"not measured: `{label}` was not in this run"
        elif not any(r.get("anchor") != "fl" for r in by_run[label]):
            why = "not measured: no anchor ran (it compares with them)"
        else:
            why = "not measured: " + "; ".join(f"{r.get('anchor')}: {r.get('status')}" for r in by_run[label])
        out.append({"target": name, "holds": None, "figures": why})
    return out


def verdict(target: dict[str, Any]) -> str:
    return {True: "HOLDS", False: "MISSED", None: "NOT MEASURED"}[target["holds"]]


COLUMNS = [
    ("status", "status", None),
    ("wall s", "wall_s", 1),
    ("to 1st step s", "time_to_first_step_s", 1),
    ("s/round", "seconds_per_round", 2),
    ("framework s/round", "framework_seconds_per_round", 3),
    ("GB/s", "effective_gb_per_s", 3),
    ("server RSS GiB", "peak_server_rss_gib", 2),
    ("tree PSS GiB", "peak_pss_gib", 2),
    ("PSS+tmpfs GiB", "peak_pss_plus_tmpfs_gib", 2),
    ("cgroup peak GiB", "cgroup_peak_gib", 2),
    ("exact", None, None),
    ("accuracy", "final_accuracy", 3),
]


def table(by_run: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| scenario | framework | " + " | ".join(c[0] for c in COLUMNS) + " | fl's ratio (time) |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 3))
    for label, results in by_run.items():
        fl = next((r for r in results if r.get("anchor") == "fl"), None)
        for r in results:
            cells = []
            for _, key, digits in COLUMNS:
                if key is None:
                    exact = (r.get("final_check") or {}).get("exact")
                    cells.append("-" if exact is None else ("yes" if exact else "NO"))
                elif key == "status":
                    status = str(r.get("status", "-"))
                    cells.append(status if len(status) < 60 else status[:57] + "...")
                else:
                    cells.append(_fmt(r.get(key), digits=digits or 2))
            ratio = "-"
            key = "seconds_per_round" if label.startswith(("large", "scale")) else "wall_s"
            if fl is not None and r is not fl and _ok(fl) and _ok(r) and r.get(key) and fl.get(key):
                ratio = f"{fl[key] / r[key]:.3f}"
            name = r.get("anchor", "?") + (f" {' '.join(r['extra'])}" if r.get("extra") else "")
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def _time_limits(specs: list[str], everything: float | None) -> dict[str, float]:
    limits = dict(TIME_LIMITS_S)
    if everything is not None:
        limits = dict.fromkeys(limits, everything)
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in limits:
            raise SystemExit(f"--time-limit {spec!r}: expected SCENARIO=SECONDS with SCENARIO one of {sorted(limits)}")
        limits[name] = float(value)
    return limits


def floor_for(mib: int, repeat: int) -> dict[str, Any]:
    """The loopback floor at the model's size, in this run (median into fresh memory), and the old
    reused-buffer best beside it for context."""
    floor = {"scenario": "loopback", **loopback.measure(mib * MiB, repeat=repeat, fresh=True)}
    reused = loopback.measure(mib * MiB, repeat=repeat, fresh=False)
    floor["reused_buffer"] = {k: reused[k] for k in ("gb_per_s", "gb_per_s_best", "seconds_median")}
    return floor


def run_scenario(
    scenario: str, extra: list[str], anchors: list[str], timeout: float, loops: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every row of one scenario: fl's (FedAvg, then its variants), then each anchor's configurations."""
    label = _label(scenario, extra)
    if scenario == "large":
        loops[label] = floor_for(int(extra[1]), repeat=5)
        print(f"[bench] loopback floor at {extra[1]} MiB: {loops[label]['gb_per_s']} GB/s", file=sys.stderr)
    results = []
    for variant in fl_variants(scenario):
        row = run_fl(scenario, [*extra, *variant], timeout)
        row["extra"] = variant
        results.append(row)
    for anchor in anchors:
        for variant in anchor_variants(anchor, scenario, extra):
            row = run_anchor(anchor, scenario, [*extra, *variant], timeout=timeout)
            row["extra"] = variant
            results.append(row)
    if scenario == "train":
        results.append(run_plain(timeout))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="overhead,large,scale,train", help="comma-separated, e.g. scale or large")
    ap.add_argument("--anchors", default="nvflare,flower", help="comma-separated; empty for fl alone")
    ap.add_argument("--quick", action="store_true", help="only 100 MiB (large) and 2 and 32 sites (scale)")
    ap.add_argument("--scale-sites", default=None, help=f"default {','.join(SCALE_SITES)}")
    ap.add_argument("--large-mib", default=None, help=f"default {','.join(LARGE_MIB)}")
    ap.add_argument(
        "--time-limit",
        action="append",
        default=[],
        metavar="SCENARIO=SECONDS",
        help=f"per-scenario limit for each run of it, repeatable (defaults {TIME_LIMITS_S})",
    )
    ap.add_argument("--timeout", type=float, default=None, help="one limit (seconds) for every scenario's runs")
    ap.add_argument("--mem-cap-gib", type=float, default=None, help="memory cap of each measured tree (default 14)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown results")
    args = ap.parse_args(argv)
    anchors = [a for a in args.anchors.split(",") if a]
    limits = _time_limits(args.time_limit, args.timeout)
    if args.mem_cap_gib is not None:
        os.environ["FL_BENCH_MEM_CAP_GIB"] = str(args.mem_cap_gib)  # read by every scenario script
    scale_sites = (args.scale_sites or ",".join(QUICK_SCALE_SITES if args.quick else SCALE_SITES)).split(",")
    large_mib = (args.large_mib or ",".join(QUICK_LARGE_MIB if args.quick else LARGE_MIB)).split(",")
    info = machine()
    print(f"[bench] {info}", file=sys.stderr, flush=True)

    by_run: dict[str, list[dict[str, Any]]] = {}
    loops: dict[str, Any] = {}
    for scenario, extra in plan(args.scenarios.split(","), scale_sites, large_mib):
        label = _label(scenario, extra)
        by_run[label] = run_scenario(scenario, extra, anchors, limits.get(scenario, 1800.0), loops)
        print(table({label: by_run[label]}), file=sys.stderr, flush=True)

    loop = {"by_label": loops}
    targets = with_unmeasured(evaluate_targets(by_run, loop), by_run)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"machine": info, "loopback": loops, "time_limits_s": limits, "runs": by_run, "targets": targets}
    floors = [
        f"{label}: {f['gb_per_s']} GB/s median into fresh memory ({f['method']}); reused buffer "
        f"{f['reused_buffer']['gb_per_s']} GB/s median, {f['reused_buffer']['gb_per_s_best']} best"
        for label, f in loops.items()
    ]
    text = "\n".join(
        [
            f"# fl benchmark, {info['date']}",
            "",
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
            f"Python {info['python']}; load average at start {info['loadavg_at_start']}, at the end "
            f"{info['loadavg_at_end']}. Time limits per run: {limits}.",
            *(["", "Loopback floor, measured right before each large scenario:", *[f"- {f}" for f in floors]]
              if floors else []),
            "",
            table(by_run),
            "",
            "## Targets",
            "",
            *[f"- {verdict(t)}: {t['target']} ({t['figures']})" for t in targets],
            "",
        ]
    )  # fmt: skip
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{info['date'][:10]}-{info['host']}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"[bench] wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
