"""FedProx on hello-pt's CNN: FedAvg on the server, the proximal term mu/2 ||w - w_global||^2 in the sites' loss.

python jobs/fedprox/job.py                        # simulate: 2 sites, 2 rounds, mu 0.01
python jobs/fedprox/job.py --mu 0.1 --export-dir /tmp/jobs   # the job folder for `fl simulate` / `fl submit`

The sites run hello-pt's script (jobs/hello-pt/src) with ``--fedprox-mu``, which adds
fl.client.fedprox.PTFedProxLoss (FLARE's PTFedProxLoss) to each local step's loss.
"""

import sys
from pathlib import Path

HELLO_PT = Path(__file__).resolve().parent.parent / "hello-pt"
sys.path.insert(0, str(HELLO_PT))

import job as hello_pt  # noqa: E402  (jobs/hello-pt/job.py)


def main():
    parser = hello_pt.define_parser("fedprox", "FedProx: FedAvg with the proximal term in the sites' loss")
    parser.add_argument("--mu", type=float, default=0.01, help="the proximal term's weight (default: 0.01)")
    args = hello_pt.parse_args(parser)
    if not args.mu > 0:
        parser.error(f"--mu must be positive, got {args.mu}")
    return hello_pt.run(
        hello_pt.build_job(args, name="fedprox", extra_script_args=["--fedprox-mu", str(args.mu)]), args
    )


if __name__ == "__main__":
    sys.exit(main())
