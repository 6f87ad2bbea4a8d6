"""A site script that reports what it sees, for the round-numbering test.

It sends back the params it received plus one (so the global model of version v holds v
everywhere) and, as its "accuracy", the mean of the params it received: the score of a model is
its version, which lets a test tell which model every number in every file is about. It prints
``current_round=R`` for every task and writes a TensorBoard point at ``global_step=current_round``.
Options: --hang-in-round R (sleep forever in round index R, printing a line first), --sleep S
(seconds of "training" per train task).
"""

import argparse
import time

import fl.client as flare
from fl.client.tracking import SummaryWriter

parser = argparse.ArgumentParser()
parser.add_argument("--hang-in-round", type=int, default=-1)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()

flare.init()
site = flare.get_site_name()
writer = SummaryWriter()
while flare.is_running():
    model = flare.receive()
    received = float(sum(float(v.sum()) for v in model.params.values()) / sum(v.size for v in model.params.values()))
    task = "validate" if flare.is_evaluate() else "train"
    print(
        f"{site}: current_round={model.current_round} total_rounds={model.total_rounds} task={task} "
        f"received={received:g}",
        flush=True,
    )
    if model.current_round == args.hang_in_round:
        print(f"{site}: hanging on purpose", flush=True)
        while True:
            time.sleep(60)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": received}))
        continue
    time.sleep(args.sleep)
    writer.add_scalar("received_model_score", received, global_step=model.current_round)
    params = {name: value + 1 for name, value in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"accuracy": received}))
print(f"{site}: done", flush=True)
