"""The benchmark: fl side by side with NVIDIA FLARE and Flower, on the same work, in the same run.

    python -m bench [--scenarios overhead,large,scale,train] [--anchors nvflare,flower] [--quick]

Each scenario runs for fl and then for each anchor, back to back (anchors in their own cached
virtual environments, bench/envs.py), each under the same process-tree sampler
(bench/measure.py). The loopback TCP ceiling is measured in the same run. Prints a table of
absolute figures and fl's ratios, whether each target holds, and writes both (JSON and Markdown)
to bench/results/ with the machine's description and the date.

Scenarios (bench/anchors/README.md has the details of each framework's side):
  overhead  hello-pt's CNN, 64 samples per site, 2 sites, 5 rounds
  large     one float32 tensor of 100 MiB and of 1 GiB, sites return params + 1, 2 sites, 2 rounds
  scale     the CNN with a little training, 2, 8 and 32 sites, 2 rounds
  train     hello-pt on the offline dataset, 2 sites, 2 rounds; plus a plain PyTorch FedAvg loop
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
def plan(scenarios: list[str], quick: bool) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = []
    for scenario in scenarios:
        if scenario == "large":
            runs += [("large", ["--mib", m]) for m in (["100"] if quick else ["100", "1024"])]
        elif scenario == "scale":
            runs += [("scale", ["--sites", n]) for n in (["2", "8"] if quick else ["2", "8", "32"])]
        else:
            runs.append((scenario, []))
    return runs


#: Extra anchor runs, in the configuration that lets an anchor finish where its defaults do not.
ANCHOR_EXTRAS: dict[tuple[str, str, tuple[str, ...]], list[str]] = {
    # FLARE's default (a worker process per site) runs out of memory at 1 GiB here; one worker finishes.
    ("nvflare", "large", ("--mib", "1024")): ["--threads", "1"],
    # FLARE's default gives 32 sites 32 worker processes (memory cap); 8 workers finish.
    ("nvflare", "scale", ("--sites", "32")): ["--threads", "8"],
}


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
        return next((r for r in by_run.get(label, []) if r.get("anchor") == "fl"), None)

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
        if loop.get("gb_per_s") and fl.get("bytes_moved_per_round"):
            limit = fl["bytes_moved_per_round"] / (loop["gb_per_s"] * 1e9)
            ratio = fl["seconds_per_round"] / limit
            targets.append({
                "target": f"{label}: fl within 3x of the loopback limit",
                "holds": ratio <= 3,
                "figures": f"{fl['seconds_per_round']:.2f} s per round vs {limit:.2f} s to copy the same bytes over "
                f"loopback TCP: {ratio:.1f}x",
            })  # fmt: skip
        mib = int(fl["params"]["mib"])
        rss = fl.get("peak_server_rss_bytes") or 0
        targets.append({
            "target": f"{label}: server peak RSS under 3x the model",
            "holds": rss < 3 * mib * MiB,
            "figures": f"{rss / GiB:.2f} GiB for a {mib} MiB model: {rss / (mib * MiB):.2f}x",
        })  # fmt: skip
    scale = {int(r["params"]["sites"]): r for k, rs in by_run.items() if k.startswith("scale") for r in rs
             if r.get("anchor") == "fl" and _ok(r)}  # fmt: skip
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


COLUMNS = [
    ("status", "status", None),
    ("wall s", "wall_s", 1),
    ("to 1st step s", "time_to_first_step_s", 1),
    ("s/round", "seconds_per_round", 2),
    ("framework s/round", "framework_seconds_per_round", 3),
    ("GB/s", "effective_gb_per_s", 3),
    ("server RSS GiB", "peak_server_rss_gib", 2),
    ("tree PSS GiB", "peak_pss_gib", 2),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="overhead,large,scale,train")
    ap.add_argument("--anchors", default="nvflare,flower", help="comma-separated; empty for fl alone")
    ap.add_argument("--quick", action="store_true", help="skip the 1 GiB and 32-site runs")
    ap.add_argument("--timeout", type=float, default=1800, help="per run, seconds")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown results")
    args = ap.parse_args(argv)
    anchors = [a for a in args.anchors.split(",") if a]
    info = machine()
    print(f"[bench] {info}", file=sys.stderr, flush=True)
    loop = {"scenario": "loopback", **loopback.measure(1024 * MiB)}
    print(f"[bench] loopback TCP: {loop['gb_per_s']} GB/s", file=sys.stderr, flush=True)

    by_run: dict[str, list[dict[str, Any]]] = {}
    for scenario, extra in plan(args.scenarios.split(","), args.quick):
        label = _label(scenario, extra)
        results = [run_fl(scenario, extra, args.timeout)]
        for anchor in anchors:
            results.append(run_anchor(anchor, scenario, extra, timeout=args.timeout))
            more = ANCHOR_EXTRAS.get((anchor, scenario, tuple(extra)))
            if more:
                rerun = run_anchor(anchor, scenario, [*extra, *more], timeout=args.timeout)
                rerun["extra"] = more
                results.append(rerun)
        if scenario == "train":
            results.append(run_plain(args.timeout))
        by_run[label] = results
        print(table({label: results}), file=sys.stderr, flush=True)

    targets = evaluate_targets(by_run, loop)
    report = {"machine": info, "loopback": loop, "runs": by_run, "targets": targets}
    text = "\n".join(
        [
            f"# fl benchmark, {info['date']}",
            "",
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
            f"Python {info['python']}; load average at start {info['loadavg_at_start']}.",
            f"Loopback TCP ceiling: {loop['gb_per_s']} GB/s ({loop['method']}).",
            "",
            table(by_run),
            "",
            "## Targets",
            "",
            *[f"- {'HOLDS' if t['holds'] else 'MISSED'}: {t['target']} ({t['figures']})" for t in targets],
            "",
        ]
    )
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
