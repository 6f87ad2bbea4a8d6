"""Run the anchors' scenarios one after another and collect their JSON lines.

    python -m bench.anchors.run_all [--anchors nvflare,flower] [--scenarios overhead,large,scale,train]
                                    [--large-mib 100,1024] [--scale-sites 2,8,32] [--out FILE]

Builds (or reuses) each anchor's venv with bench/envs.py; an anchor whose install failed gets one
``{"status": "not installed: ..."}`` line per scenario and the rest goes on.  Each scenario runs
alone, under ``nice -n 10``, and prints one JSON line; this collects them (stdout and ``--out``)
with the loopback TCP ceiling first.  ``--extra ANCHOR:SCENARIO:ARGS`` adds a run with extra
arguments, e.g. ``--extra "nvflare:scale:--sites 32 --threads 8"``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import envs, loopback  # noqa: E402


def run_anchor(anchor: str, scenario: str, extra: list[str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """For bench/run.py: ensure the anchor's venv, run one scenario, return its JSON line as a dict
    (or ``{"status": "not installed: ..."}``)."""
    env = envs.ensure_env(anchor)
    if not env.ok:
        first = (env.error or "").splitlines()[0] if env.error else ""
        return {"anchor": anchor, "scenario": scenario, "args": extra or [], "status": f"not installed: {first}"}
    res = _run(env.python, anchor, scenario, list(extra or []), timeout)
    res.setdefault("versions", env.versions)
    return res


def _run(python: Path, anchor: str, scenario: str, extra: list[str], timeout: float) -> dict[str, Any]:
    script = HERE / anchor / f"{scenario}.py"
    cmd = ["nice", "-n", "10", str(python), str(script), "--timeout", str(timeout), *extra]
    print(f"[run_all] {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, timeout=timeout + 300)
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                break
    return {
        "anchor": anchor,
        "scenario": scenario,
        "status": f"failed: exit code {r.returncode}, no JSON line",
        "args": extra,
        "wall_s": round(time.monotonic() - t0, 1),
        "stdout_tail": r.stdout[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default="nvflare,flower")
    ap.add_argument("--scenarios", default="overhead,large,scale,train")
    ap.add_argument("--large-mib", default="100,1024")
    ap.add_argument("--scale-sites", default="2,8,32")
    ap.add_argument("--timeout", type=float, default=1800, help="per scenario run, seconds")
    ap.add_argument("--extra", action="append", default=[], help="ANCHOR:SCENARIO:ARGS, repeatable")
    ap.add_argument("--no-loopback", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file too")
    a = ap.parse_args(argv)

    out_f = open(a.out, "a") if a.out else None  # noqa: SIM115

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj, default=str)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()

    if not a.no_loopback:
        emit({"scenario": "loopback", **loopback.measure(1024 * loopback.MiB)})

    runs: list[tuple[str, str, list[str]]] = []
    for anchor in a.anchors.split(","):
        for scenario in a.scenarios.split(","):
            if scenario == "large":
                runs += [(anchor, scenario, ["--mib", m]) for m in a.large_mib.split(",")]
            elif scenario == "scale":
                runs += [(anchor, scenario, ["--sites", n]) for n in a.scale_sites.split(",")]
            else:
                runs.append((anchor, scenario, []))
    for spec in a.extra:
        anchor, scenario, rest = spec.split(":", 2)
        runs.append((anchor, scenario, shlex.split(rest)))

    installed: dict[str, envs.AnchorEnv] = {}
    for anchor, scenario, extra in runs:
        if anchor not in installed:
            installed[anchor] = envs.ensure_env(anchor)
        env = installed[anchor]
        if not env.ok:
            emit(
                {
                    "anchor": anchor,
                    "scenario": scenario,
                    "args": extra,
                    "status": f"not installed: {(env.error or '').splitlines()[0]}",
                }
            )
            continue
        res = _run(env.python, anchor, scenario, extra, a.timeout)
        res.setdefault("versions", env.versions)
        emit(res)
    if out_f:
        out_f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
