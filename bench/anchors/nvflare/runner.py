"""NVIDIA FLARE side of the benchmark's scenarios: a FedAvg job recipe run in FLARE's simulator.

As in FLARE's examples/hello-world/hello-pt/job.py: ``FedAvgRecipe(model=..., train_script=
"client.py", train_args=...)`` executed with ``SimEnv(num_clients=N, num_threads=T)``.  The
simulator runs the server in one process and each client in a worker process
(``simulator_worker``); with T = N (SimEnv's default) every client has its own process.  The
Client API script runs in-process in that worker (``launch_external_process=False``, the
recipe's default).

The driver (no ``--inner``) runs this same script with ``--inner`` under the tree sampler and
prints one JSON line; see bench/anchors/common.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.anchors import common  # noqa: E402

JOB_NAME = "bench"
LARGE_MODEL_OPTIONS = (
    "server_expected_format=ExchangeFormat.PYTORCH, enable_tensor_disk_offload=True, "
    "server_memory_gc_rounds=1, client_memory_gc_rounds=1"
)


def _is_server(cmdline: Sequence[str]) -> bool:
    # The simulator's main process forks the process that hosts the server; both carry this
    # cmdline, the client workers run nvflare.private.fed.app.simulator.simulator_worker.
    return "nvflare.private.fed.app.simulator.simulator" in cmdline


def _sim_root(workdir: Path) -> Path:
    return workdir / "sim"


def _server_app_dir(workdir: Path) -> Path:
    return _sim_root(workdir) / JOB_NAME / "server" / "simulate_job" / "app_server"


def inner(scenario: str, args: Any) -> None:
    """Build the recipe and run it in the simulator (inside the measured tree)."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import SimEnv

    common.emit("job_start")
    if scenario == "large":
        model: dict[str, Any] = {"class_path": "bench.anchors.pt.BigModel", "args": {"mib": args.mib}}
        train_args = "--scenario large"
    else:
        model = {"class_path": "bench.anchors.pt.SimpleNetwork", "args": {"seed": 0}}
        train_args = (
            f"--scenario {scenario} --train-size {args.train_size} --epochs {args.epochs} "
            f"--batch-size {args.batch_size} --lr {args.lr} --momentum {args.momentum}"
        )
    recipe = FedAvgRecipe(
        **large_model_options(args.large_model_options),
        name=JOB_NAME,
        min_clients=args.sites,
        num_rounds=args.rounds,
        model=model,
        train_script=str(HERE / "client.py"),
        train_args=train_args,
    )
    threads = args.threads if args.threads else args.sites
    sim_root = str(_sim_root(Path(args.workdir)))
    env = SimEnv(num_clients=args.sites, num_threads=threads, workspace_root=sim_root)
    run = recipe.execute(env)
    common.write_result(job_result=str(run.get_result()))


def large_model_options(enabled: bool) -> dict[str, Any]:
    """FLARE 2.9's own options for large models (FedAvgRecipe's arguments): tensors exchanged as
    PyTorch tensors rather than numpy (no conversion copy), streamed tensors downloaded to disk files
    instead of memory (``enable_tensor_disk_offload``, which FLARE allows only with the PyTorch format),
    and a gc.collect + malloc_trim after every round on the server and the clients."""
    if not enabled:
        return {}
    from nvflare.client.config import ExchangeFormat

    return {
        "server_expected_format": ExchangeFormat.PYTORCH,
        "enable_tensor_disk_offload": True,
        "server_memory_gc_rounds": 1,
        "client_memory_gc_rounds": 1,
    }


def _post(scenario: str, args: Any) -> Any:
    """After the measured run: read FLARE's saved global model (PTFileModelPersistor's file)."""

    def post(ws: Path, out: dict[str, Any]) -> dict[str, Any]:
        from bench.anchors import pt

        return pt.check_saved_global(_server_app_dir(ws) / "FL_global_model.pt", scenario, args, "FLARE")

    return post


def main(scenario: str, argv: list[str] | None = None) -> int:
    ap = common.base_parser(f"NVIDIA FLARE: the {scenario} scenario", scenario)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="simulator threads (client worker processes); default = sites, SimEnv's default",
    )
    ap.add_argument(
        "--large-model-options",
        action="store_true",
        help="FLARE's large-model options: ExchangeFormat.PYTORCH, enable_tensor_disk_offload, memory gc every round",
    )
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    if args.inner:
        inner(scenario, args)
        return 0

    params = {k: getattr(args, k) for k in common.SCENARIOS[scenario]}
    params["threads"] = args.threads or args.sites
    if args.large_model_options:
        params["large_model_options"] = LARGE_MODEL_OPTIONS
    out = common.drive(
        anchor="nvflare",
        scenario=scenario,
        script=str(HERE / f"{scenario}.py"),
        args=args,
        argv=raw,
        params=params,
        rounds=args.rounds,
        server_predicate=_is_server,
        post=_post(scenario, args),
        framework_dists=("nvflare",),
    )
    out["simulator"] = (
        f"FLARE simulator via Recipe API SimEnv: server in its own process, {params['threads']} client "
        f"worker process(es) (num_threads={params['threads']}) for {args.sites} sites; Client API script "
        "in-process in the worker"
    )
    if scenario == "large":
        common.add_throughput(out, args.sites, args.mib)
    common.print_json(out)
    return 0 if out["status"] == "ok" else 1
