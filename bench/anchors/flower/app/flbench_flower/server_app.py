"""ServerApp: Flower's own FedAvg strategy, as in quickstart-pytorch.

Every selected node trains each round (``fraction_train=1.0``) and there is no federated
evaluation round (``fraction_evaluate=0.0``): the benchmark evaluates the final global model
itself, the same way for every framework.  At the end the ServerApp saves the final model
(``final_model.pt`` beside $FL_BENCH_RESULT) or, in the large scenario, checks that every
element equals initial + rounds and records the answer.
"""

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench.anchors import pt
from bench.anchors.common import RESULT_ENV, write_result

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    scenario = str(cfg["scenario"])
    n_sites = int(cfg["num-sites"])
    num_rounds = int(cfg["num-server-rounds"])

    large = scenario == "large"
    initial = pt.big_state_dict(int(cfg["model-mib"])) if large else pt.SimpleNetwork(seed=0).state_dict()
    arrays = ArrayRecord(initial)
    del initial

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n_sites,
        min_available_nodes=n_sites,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": float(cfg["learning-rate"])}),
        num_rounds=num_rounds,
    )

    state_dict = result.arrays.to_torch_state_dict()
    out_dir = Path(os.environ.get(RESULT_ENV, "result.json")).resolve().parent
    if scenario == "large":
        check = pt.check_exact(state_dict["weight"], float(num_rounds))
        write_result(final_check=check, final_check_by="ServerApp, on FedAvg's final ArrayRecord")
    else:
        torch.save(state_dict, out_dir / "final_model.pt")
        write_result(final_model="final_model.pt")
