"""fl side of the benchmark's scenarios: a FedJob run in fl's simulator.

As in jobs/hello-pt/job.py: ``FedJob`` + ``FedAvg`` + the initial model + ``ScriptRunner("client.py")``
per site, run with ``fl.simulator.simulate``: the server in the simulator's process, the site
agents in child processes spread over the cores (gRPC over loopback), each site's training script
in a process of its own.

The driver (no ``--inner``) runs this same script with ``--inner`` under the tree sampler and
prints one JSON line, exactly as for the anchors (bench/anchors/common.py).
"""

from __future__ import annotations

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
}


def _is_server(cmdline: Sequence[str]) -> bool:
    # The simulator process hosts the server (and the site agents, which hold no models).
    return "--inner" in cmdline and any("fl_side" in part for part in cmdline)


def export(scenario: str, args: Any, workdir: Path) -> Path:
    """Build the job with the Job API and export it (in the driver, outside the measured tree,
    as a user exports a job before submitting it)."""
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


def inner(scenario: str, args: Any) -> None:
    """Run the exported job in the simulator (inside the measured tree)."""
    from fl.simulator import simulate

    common.emit("job_start")
    folder = Path(args.workdir) / "export" / "bench"
    code = simulate(folder, Path(args.workdir) / "sim", n_clients=args.sites, progress=False)
    common.write_result(job_exit_code=code, server_imported_torch="torch" in sys.modules)
    if code != 0:
        raise SystemExit(code)


def _run_dir(ws: Path) -> Path:
    jobs = sorted((ws / "sim" / "server" / "jobs").iterdir())
    return jobs[-1]


def _post(scenario: str, args: Any) -> Any:
    """After the measured run: read fl's saved global model (FL_global_model.pt)."""

    def post(ws: Path, out: dict[str, Any]) -> dict[str, Any]:
        from bench.anchors import pt

        return pt.check_saved_global(_run_dir(ws) / "FL_global_model.pt", scenario, args, "fl")

    return post


def main(scenario: str, argv: list[str] | None = None) -> int:
    ap = common.base_parser(f"fl: the {scenario} scenario", scenario)
    ap.add_argument("--workflow", choices=sorted(WORKFLOWS), default="FedAvg", help="fl's server-side algorithm")
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    if args.inner:
        inner(scenario, args)
        return 0

    import fl

    params = {k: getattr(args, k) for k in common.SCENARIOS[scenario]}
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
        setup=lambda ws, env: export(scenario, args, ws) and None,
    )
    out["versions"]["fl"] = fl.__version__
    out["simulator"] = (
        f"fl simulator: server in one process, {args.sites} site agents in child processes spread over "
        "the cores (gRPC over loopback), one training-script process per site"
    )
    if scenario == "large":
        common.add_throughput(out, args.sites, args.mib)
    common.print_json(out)
    return 0 if out["status"] == "ok" else 1
