"""Cross-site evaluation after FedAvg: hello-pt's CNN trained with FedAvg, then every site scores every model.

python jobs/cross-site-eval/job.py                     # simulate: 2 sites, 2 rounds, then cross-site evaluation
python jobs/cross-site-eval/job.py --export-dir /tmp/jobs   # the job folder for `fl simulate` / `fl submit`

The sites run hello-pt's script (jobs/hello-pt/src): a ``submit_model`` task sends the site's last
local model, a ``validate`` task scores the model it carries. The site x model matrix (the global
model, the best global model and each site's) is written to the job's ``cross_site_val/cross_val_results.json``.
"""

import sys
from pathlib import Path

HELLO_PT = Path(__file__).resolve().parent.parent / "hello-pt"
sys.path.insert(0, str(HELLO_PT))

import job as hello_pt  # noqa: E402  (jobs/hello-pt/job.py)


def main():
    parser = hello_pt.define_parser("cross-site-eval", "FedAvg, then cross-site evaluation of the models")
    parser.add_argument("--validation-timeout", type=float, default=600, help="seconds per model (default: 600)")
    args = hello_pt.parse_args(parser)

    from fl.workflows.cross_site_eval import CrossSiteModelEval

    evaluation = CrossSiteModelEval(validation_timeout=args.validation_timeout)
    return hello_pt.run(hello_pt.build_job(args, name="cross-site-eval", after_training=[evaluation]), args)


if __name__ == "__main__":
    sys.exit(main())
