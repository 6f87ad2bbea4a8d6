"""fl side of the benchmark's scenarios: a FedJob run in fl's simulator.

As in jobs/hello-pt/job.py: ``FedJob`` + ``FedAvg`` + the initial model + ``ScriptRunner("client.py")``
per site, exported (``python job.py --export-dir``) and run in the simulator with its public options
only (``fl simulate JOB -n SITES [-t THREADS]``, here ``fl.simulator.simulate(n_clients=, threads=)``):
whatever the simulator does with many sites is what is measured.

Both steps are inside the measured window, as the anchors' recipe build is in theirs: the export runs
in a process of its own first (it imports torch to describe the model; the server never does), then
the simulator (the server in its process, the site agents and scripts in child processes).

The driver (no ``--inner``) runs this same script with ``--inner`` under the tree sampler and
prints one JSON line, exactly as for the anchors (bench/anchors/common.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.anchors import common  # noqa: E402

#: fl's server-side algorithms the fl side can run (--workflow; the anchors run FedAvg).
WORKFLOWS = {
    "FedAvg": "fl.workflows.fedavg.FedAvg",
    "FedAvgM": "fl.workflows.fedopt.FedAvgM",
    "FedAdam": "fl.workflows.fedopt.FedAdam",
    "FedYogi": "fl.workflows.fedopt.FedYogi",
    "FedAdagrad": "fl.workflows.fedopt.FedAdagrad",
    "FedMedian": "fl.workflows.robust_strategies.FedMedian",
}
#: The algorithms whose global model after the large scenario is exactly 0 + rounds (params + 1 at
#: every site); a server optimizer (FedAdam...) moves it by its own rule, so there is nothing exact to check.
EXACT_IN_LARGE = {"FedAvg", "FedMedian"}


def _is_server(cmdline: Sequence[str]) -> bool:
    # The simulator process hosts the server (and the site agents, which hold no models).
    return "--inner" in cmdline and any("fl_side" in part for part in cmdline)


def export(scenario: str, args: Any, workdir: Path) -> Path:
    """Build the job with the Job API and export it (``--export-only``: a process of its own inside
    the measured tree, as ``python job.py --export-dir`` before ``fl simulate``)."""
    from bench.anchors import pt
    from fl.config import resolve_class
    from fl.job import FedJob, ScriptRunner

    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        if scenario == "large":
            import torch

            with torch.device("meta"):  # describes the model without allocating it
                model: Any = pt.BigModel(mib=args.mib)
            script_args = "--scenario large"
        else:
            model = pt.SimpleNetwork(seed=0)
            script_args = (
                f"--scenario {scenario} --train-size {args.train_size} --epochs {args.epochs} "
                f"--batch-size {args.batch_size} --lr {args.lr} --momentum {args.momentum}"
            )
        job = FedJob(name="bench", min_clients=args.sites, key_metric=None)
        workflow = resolve_class(WORKFLOWS[args.workflow])
        job.to(workflow(num_clients=args.sites, num_rounds=args.rounds), "server")
        job.to(model, "server")
        job.to_clients(ScriptRunner(script="client.py", script_args=script_args))
        job.to_clients(str(REPO_ROOT / "bench" / "anchors"))  # the shared model/data code, as the anchors have it
        return job.export_job(workdir / "export")
    finally:
        os.chdir(cwd)


def inner(scenario: str, args: Any, argv: Sequence[str]) -> None:
    """Export the job, then run it in the simulator (both inside the measured tree)."""
    import subprocess
    import time

    common.emit("job_start")
    t0 = time.monotonic()
    subprocess.run([sys.executable, sys.argv[0], "--export-only", *argv], check=True)
    export_s = round(time.monotonic() - t0, 3)
    common.emit("exported")

    from fl.simulator import simulate

    folder = Path(args.workdir) / "export" / "bench"
    threads = args.threads or None
    code = simulate(folder, Path(args.workdir) / "sim", n_clients=args.sites, threads=threads, progress=False)
    common.write_result(
        job_exit_code=code, export_s=export_s, server_imported_torch="torch" in sys.modules, fl_threads=threads
    )
    if code != 0:
        raise SystemExit(code)


def _run_dir(ws: Path) -> Path:
    jobs = sorted((ws / "sim" / "server" / "jobs").iterdir())
    return jobs[-1]


def _post(scenario: str, args: Any) -> Any:
    """After the measured run: read fl's saved global model (FL_global_model.pt)."""

    def post(ws: Path, out: dict[str, Any]) -> dict[str, Any]:
        from bench.anchors import pt

        if scenario == "large" and args.workflow not in EXACT_IN_LARGE:
            why = f"{args.workflow}: its server optimizer moves the model by its own rule, no exact value to check"
            return {"final_check": {"exact": None, "why": why}}
        return pt.check_saved_global(_run_dir(ws) / "FL_global_model.pt", scenario, args, "fl")

    return post


def main(scenario: str, argv: list[str] | None = None) -> int:
    ap = common.base_parser(f"fl: the {scenario} scenario", scenario)
    ap.add_argument("--workflow", choices=sorted(WORKFLOWS), default="FedAvg", help="fl's server-side algorithm")
    ap.add_argument(
        "--threads", type=int, default=0, help="the simulator's -t/--threads (sites training at once); default: its own"
    )
    ap.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    if args.export_only:
        export(scenario, args, Path(args.workdir))
        return 0
    if args.inner:
        inner(scenario, args, [a for a in raw if a != "--inner"])
        return 0

    import fl

    params = {k: getattr(args, k) for k in common.SCENARIOS[scenario]}
    params["workflow"] = args.workflow
    params["threads"] = args.threads or "simulator default"
    out = common.drive(
        anchor="fl",
        scenario=scenario,
        script=str(HERE / f"{scenario}.py"),
        args=args,
        argv=raw,
        params=params,
        rounds=args.rounds,
        server_predicate=_is_server,
        post=_post(scenario, args),
        framework_dists=(),
    )
    out["versions"]["fl"] = fl.__version__
    out["simulator"] = (
        f"fl simulator (fl.simulator.simulate, n_clients={args.sites}, threads={args.threads or None}), "
        "the job exported first in its own process; both inside the measured window"
    )
    if scenario == "large":
        common.add_throughput(out, args.sites, args.mib)
    common.print_json(out)
    return 0 if out["status"] == "ok" else 1
