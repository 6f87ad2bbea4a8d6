"""Hello PyTorch with the Job API: FedAvg over sites training the CIFAR10 tutorial's CNN.

python jobs/hello-pt/job.py                      # simulate: 2 sites, 2 rounds
python jobs/hello-pt/job.py --export-dir /tmp/jobs   # write the job folder for `fl simulate` / `fl submit`

jobs/fedprox and jobs/cross-site-eval build on this file (define_parser, build_job, run) and its src/.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def define_parser(name="hello-pt", description="Hello PyTorch: FedAvg with the Job API"):
    # FLARE's spellings (--n_clients, --num_rounds, --batch_size) work as well as fl's.
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add(
        "--n-sites",
        "--n-clients",
        "--n_clients",
        dest="n_sites",
        type=int,
        default=2,
        metavar="N",
        help="number of sites, named site-1 ... site-N (default: 2)",
    )
    add("--sites", metavar="NAMES", help="comma-separated site names instead of --n-sites")
    add(
        "--num-rounds",
        "--num_rounds",
        dest="num_rounds",
        type=int,
        default=2,
        metavar="N",
        help="FedAvg rounds (default: 2)",
    )
    add(
        "--sample",
        type=int,
        metavar="K",
        help="sites that train each round, drawn anew each round (FedAvg's num_clients; default: every site)",
    )
    add("-w", "--workspace", default=f"/tmp/fl/{name}", help="simulator workspace (default: %(default)s)")
    add("--export-dir", help="export the job folder here instead of simulating")
    add("-t", "--threads", type=int, help="sites training at once in the simulator (default: all)")
    add("--gpu", metavar="IDS", help="comma-separated GPU ids, assigned to sites in turn (default: none)")
    add(
        "--dataset",
        choices=["auto", "cifar10", "synthetic"],
        default="auto",
        help="auto: CIFAR10 if it is on disk or can be downloaded, else a generated dataset (default: auto)",
    )
    add("--data-root", help="where sites find (or download) CIFAR10 (default: $FL_DATA_ROOT or /tmp/fl/data)")
    add("--train-size", type=int, help="training samples per site (default: all of CIFAR10, 2000 generated)")
    add("--test-size", type=int, help="validation samples per site (default: all of CIFAR10, 500 generated)")
    add("--epochs", type=int, default=2, help="local epochs per round (default: 2)")
    add(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        help="default: 4 for CIFAR10, 16 for the generated dataset",
    )
    add("--lr", type=float, help="learning rate (default: 0.001 for CIFAR10, 0.02 for the generated dataset)")
    return parser


def script_args(args):
    """The site script's command line from the job's arguments."""
    result = ["--dataset", args.dataset, "--epochs", str(args.epochs)]
    options = (
        ("--data-root", args.data_root),
        ("--train-size", args.train_size),
        ("--test-size", args.test_size),
        ("--batch-size", args.batch_size),
        ("--lr", args.lr),
    )
    for flag, value in options:
        if value is not None:
            result += [flag, str(value)]
    return result


def site_names(args):
    """--sites if given, else site-1 ... site-N."""
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    return sites or [f"site-{i + 1}" for i in range(args.n_sites)]


def build_job(args, name="hello-pt", extra_script_args=(), after_training=()):
    """FedAvg on the CNN over the sites running src/hello-pt_cifar10_fl.py; ``after_training``: workflows after it."""
    os.chdir(HERE)  # the job's code paths below are relative to this folder
    sys.path.insert(0, str(HERE))

    from src.simple_network import SimpleNetwork

    from fl.job import FedJob, ScriptRunner
    from fl.workflows.fedavg import FedAvg

    sites = site_names(args)
    job = FedJob(name=name, min_clients=len(sites))

    # Define the controller workflow and send to server
    controller = FedAvg(num_clients=min(args.sample or len(sites), len(sites)), num_rounds=args.num_rounds)
    job.to(controller, "server")
    for workflow in after_training:
        job.to(workflow, "server")

    # Define the initial global model and send to server
    job.to(SimpleNetwork(), "server")

    # Add clients
    for site in sites:
        runner = ScriptRunner(
            script="src/hello-pt_cifar10_fl.py", script_args=shlex.join(script_args(args) + list(extra_script_args))
        )
        job.to(runner, site)
    return job


def run(job, args):
    """Export the job folder (--export-dir) or run it in the simulator."""
    if args.export_dir is not None:
        print(f"job folder: {job.export_job(Path(args.export_dir))}")
        return 0
    return job.simulator_run(Path(args.workspace), threads=args.threads, gpu=args.gpu)


def parse_args(parser):
    """The parsed arguments, with the workspace and export folder absolute (build_job changes folder)."""
    args = parser.parse_args()
    args.workspace = os.path.abspath(args.workspace)
    args.export_dir = os.path.abspath(args.export_dir) if args.export_dir else None
    return args


def main():
    args = parse_args(define_parser())
    return run(build_job(args), args)


if __name__ == "__main__":
    sys.exit(main())
