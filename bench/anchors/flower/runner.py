"""Flower side of the benchmark's scenarios: a Flower App run with ``flwr run`` on the Simulation Engine.

As in Flower's quickstart-pytorch: the App in ``app/`` (``ServerApp`` with Flower's ``FedAvg``
strategy, ``ClientApp`` with ``@app.train()``) is started with ``flwr run <app> local --stream``.
``flwr run`` starts the managed local SuperLink (simulation mode, subprocess isolation), which
runs the App in a ``flwr-simulation`` process: the ServerApp there, the ClientApps in the Ray
backend's actors.  The measured tree is ``flwr run`` and everything it starts, the SuperLink
included (it detaches; the sampler follows it by PID and by an environment tag, and ends it
after the run).

Settings, each recorded in the JSON: ``FLWR_HOME`` is a fresh folder per run (so the SuperLink
starts cold and leaves nothing behind), runtime dependency installation is off (the venv already
has everything: bench/envs.py), telemetry is off, the SuperLink's two local ports are free
ports, Ray's temp folder is under /tmp/fl-bench-*, and each ClientApp gets
``client-resources-num-cpus`` CPUs (default 1, so the Ray backend runs two ClientApps at once
on this 2-core machine; Flower's own default of 2 would run one at a time).
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.anchors import common  # noqa: E402

APP_DIR = HERE / "app"
SUPERLINK_TIMEOUT_TEXT = "Failed to start local SuperLink within"
SUPERLINK_RETRIES = 1

FLOWER_CONFIG = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _role(name: str):
    def pred(cmdline: Sequence[str]) -> bool:
        return any(Path(a).name == name for a in cmdline[:2])

    return pred


def _is_ray_worker(cmdline: Sequence[str]) -> bool:
    joined = " ".join(cmdline[:3])
    return "ray::" in joined or "default_worker.py" in " ".join(cmdline)


ROLES = {
    "superlink": _role("flower-superlink"),
    "superexec": _role("flower-superexec"),
    "flwr-simulation (ServerApp + simulation engine)": _role("flwr-simulation"),
    "flwr run (CLI)": lambda c: len(c) > 2 and Path(c[1]).name == "flwr" and c[2] == "run",
    "ray worker (ClientApp actor)": _is_ray_worker,
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'"
    return repr(v)


def main(scenario: str, argv: list[str] | None = None) -> int:
    ap = common.base_parser(f"Flower: the {scenario} scenario", scenario)
    ap.add_argument(
        "--client-cpus",
        type=int,
        default=1,
        help="Ray CPUs per ClientApp (Flower's client-resources-num-cpus); default 1; 0: Flower's own default",
    )
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)

    sp = common.SCENARIOS[scenario]
    run_config: dict[str, Any] = {
        "scenario": scenario,
        "num-server-rounds": args.rounds,
        "num-sites": args.sites,
    }
    if scenario == "large":
        run_config["model-mib"] = args.mib
    else:
        run_config.update(
            {
                "train-size": args.train_size,
                "val-size": args.val_size,
                "local-epochs": args.epochs,
                "batch-size": args.batch_size,
                "learning-rate": float(args.lr),
                "momentum": float(args.momentum),
            }
        )
    fed_config: dict[str, Any] = {"num-supernodes": args.sites}
    if args.client_cpus:
        fed_config["client-resources-num-cpus"] = args.client_cpus
    flwr = str(Path(sys.executable).parent / "flwr")
    ray_tmp = Path(tempfile.mkdtemp(prefix="fl-bench-ray-", dir="/tmp"))

    def setup(ws: Path, env: dict[str, str]) -> None:
        home = ws / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(FLOWER_CONFIG)
        env["FLWR_HOME"] = str(home)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(_free_port())
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(_free_port())
        env["RAY_TMPDIR"] = str(ray_tmp)
        env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
        env["PATH"] = str(Path(sys.executable).parent) + ":" + env.get("PATH", "")

    def command(ws: Path) -> list[str]:
        return [
            flwr,
            "run",
            str(APP_DIR),
            "local",
            "--stream",
            "--run-config",
            " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items()),
            "--federation-config",
            " ".join(f"{k}={_toml_value(v)}" for k, v in fed_config.items()),
        ]

    def post(ws: Path, out: dict[str, Any]) -> dict[str, Any]:
        if scenario == "train":
            import torch

            from bench.anchors import pt

            path = ws / "final_model.pt"
            if not path.exists():
                return {"final_accuracy": None, "post_error": "the ServerApp saved no final_model.pt"}
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sites = [f"site-{i}" for i in range(1, args.sites + 1)]
            return pt.evaluate_global(sd, sites, args.val_size)
        return {}

    params = {k: getattr(args, k) for k in sp}
    params["client_cpus"] = args.client_cpus or "Flower's default"
    try:
        for attempt in range(1 + SUPERLINK_RETRIES):
            out = common.drive(
                anchor="flower",
                scenario=scenario,
                script=str(HERE / f"{scenario}.py"),
                args=args,
                argv=raw,
                params=params,
                rounds=args.rounds,
                server_predicate=_role("flwr-simulation"),
                post=post,
                framework_dists=("flwr", "ray"),
                command=command,
                setup=setup,
                roles=ROLES,
            )
            if SUPERLINK_TIMEOUT_TEXT not in str(out.get("error_tail", "")):
                break
            # flwr gives its local SuperLink a fixed 15 s to start (LOCAL_SUPERLINK_STARTUP_TIMEOUT, no
            # setting): on a loaded machine that is a start-up failure, not Flower's result; once more.
            out["status"] = "failed: flwr's local SuperLink did not start within its fixed 15 s"
            print(f"[bench] {out['status']} (attempt {attempt + 1})", file=sys.stderr, flush=True)
        out["superlink_start_attempts"] = attempt + 1
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # `flwr run --stream` exits 0 even when the run failed inside: the ServerApp's own record of
    # its last step is the proof that the run completed.
    if out["status"] == "ok" and "final_model" not in out and "final_check" not in out:
        out["status"] = "failed: the run did not complete (the ServerApp recorded no result)"
    out["simulator"] = (
        "Flower Simulation Engine via `flwr run` (managed local SuperLink, subprocess isolation): "
        f"ServerApp in the flwr-simulation process, {args.sites} virtual SuperNodes, ClientApps in "
        f"Ray backend actors with {args.client_cpus or 'the default number of'} CPU(s) each"
    )
    out["flower_settings"] = {
        "run_config": run_config,
        "federation_config": fed_config,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    if scenario == "large":
        common.add_throughput(out, args.sites, args.mib)
    common.print_json(out)
    return 0 if out["status"] == "ok" else 1
