"""Hello PyTorch with the Job API: FedAvg over sites training the CIFAR10 tutorial's CNN.

python jobs/hello-pt/job.py                      # simulate: 2 sites, 2 rounds
python jobs/hello-pt/job.py --export-dir /tmp/jobs   # write the job folder for `fl simulate` / `fl submit`
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def define_parser():
    # FLARE's spellings (--n_clients, --num_rounds, --batch_size) work as well as fl's.
    parser = argparse.ArgumentParser(description="Hello PyTorch: FedAvg with the Job API")
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
    add("-w", "--workspace", default="/tmp/fl/hello-pt", help="simulator workspace (default: %(default)s)")
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


def main():
    args = define_parser().parse_args()
    workspace = Path(args.workspace).resolve()
    export_dir = Path(args.export_dir).resolve() if args.export_dir else None
    os.chdir(HERE)  # the job's code paths below are relative to this folder
    sys.path.insert(0, str(HERE))

    from src.simple_network import SimpleNetwork

    from fl.job import FedJob, ScriptRunner
    from fl.workflows.fedavg import FedAvg

    script_args = ["--dataset", args.dataset, "--epochs", str(args.epochs)]
    options = (
        ("--data-root", args.data_root),
        ("--train-size", args.train_size),
        ("--test-size", args.test_size),
        ("--batch-size", args.batch_size),
        ("--lr", args.lr),
    )
    for flag, value in options:
        if value is not None:
            script_args += [flag, str(value)]

    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    if sites:
        args.n_sites = len(sites)
    sites = sites or [f"site-{i + 1}" for i in range(args.n_sites)]

    job = FedJob(name="hello-pt", min_clients=args.n_sites)

    # Define the controller workflow and send to server
    controller = FedAvg(num_clients=args.n_sites, num_rounds=args.num_rounds)
    job.to(controller, "server")

    # Define the initial global model and send to server
    job.to(SimpleNetwork(), "server")

    # Add clients
    for site in sites:
        runner = ScriptRunner(script="src/hello-pt_cifar10_fl.py", script_args=shlex.join(script_args))
        job.to(runner, site)

    if export_dir is not None:
        print(f"job folder: {job.export_job(export_dir)}")
        return 0
    return job.simulator_run(workspace, threads=args.threads, gpu=args.gpu)


if __name__ == "__main__":
    sys.exit(main())
