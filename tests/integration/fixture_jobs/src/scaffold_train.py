"""A SCAFFOLD site script: a few SGD steps toward this site's own target with PTScaffoldHelper's corrections.

The model is the fixture's FlatModel (one float32 ``weight`` of 16). site-1 pulls it toward 1.0,
site-2 toward 3.0 (``--target`` overrides): the sites' optima differ, which is what the control
variates correct for. It sends the trained params plus ``scaffold_c_diff.weight``.
"""

import argparse
import copy

import torch
from torch import nn

import fl.client as flare
from fl.client.scaffold import PTScaffoldHelper, split_controls, with_control_diff

parser = argparse.ArgumentParser()
parser.add_argument("--target", type=float, default=None)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--lr", type=float, default=0.1)
args = parser.parse_args()


class FlatModel(nn.Module):
    def __init__(self, numel: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))


flare.init()
site = flare.get_site_name()
target = args.target if args.target is not None else (1.0 if site == "site-1" else 3.0)
model = FlatModel()
helper = PTScaffoldHelper()
helper.init(model)
while flare.is_running():
    received = flare.receive()
    params, c_global = split_controls(received.params)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"loss": float(((model.weight - target) ** 2).mean())}))
        continue
    helper.load_global_controls(c_global)
    global_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    c_global_para, c_local_para = helper.get_params()
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = ((model.weight - target) ** 2).mean() * 16
        loss.backward()
        optimizer.step()
        helper.model_update(model, args.lr, c_global_para, c_local_para)
    helper.terms_update(model, args.lr, c_global_para, c_local_para, global_model)
    trained = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    flare.send(
        flare.FLModel(
            params=with_control_diff(trained, helper.get_delta_controls()),
            meta={"NUM_STEPS_CURRENT_ROUND": args.steps},
        )
    )
print(f"{site}: done", flush=True)
