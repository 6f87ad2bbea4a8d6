"""The training script's loop, shared by the frameworks whose Client API is FLARE's (FLARE and fl).

``flare.init()``, then ``while flare.is_running(): receive -> local work -> send``. The local
work is hello-pt's training loop (bench/anchors/pt.py, shared with every framework) or, in the
large scenario, params + 1. Unlike hello-pt, the script does not evaluate the received model
every round: the benchmark evaluates the final global model itself, the same way for every
framework. FedAvg weighs each site by ``NUM_STEPS_CURRENT_ROUND``, as hello-pt sends it.
"""

import argparse
from typing import Any

from bench.anchors import pt
from bench.anchors.common import emit


def run(flare: Any) -> None:
    """The site's loop with a Client API module (``nvflare.client`` or ``fl.client``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="overhead")
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--momentum", type=float, default=0.9)
    args = ap.parse_args()

    flare.init()
    site = flare.get_site_name()
    emit("client_start", site=site)

    model = None
    dataset = None
    if args.scenario != "large":
        model = pt.SimpleNetwork(seed=None)
        dataset = pt.make_dataset(site, "train", args.train_size)

    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        rnd = int(input_model.current_round)
        emit("received", site=site, round=rnd)

        if args.scenario == "large":
            params = pt.plus_one(input_model.params)
            meta = {"NUM_STEPS_CURRENT_ROUND": 1}
        else:
            assert model is not None and dataset is not None
            model.load_state_dict(input_model.params)
            emit("model_in", site=site, round=rnd, checksum=pt.state_dict_checksum(model.state_dict()))
            stats = pt.train(
                model,
                dataset,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                momentum=args.momentum,
                seed=pt._stable_seed(site, str(rnd)),
                on_first_step=lambda r=rnd: emit("first_step", site=site, round=r),
            )
            params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            emit(
                "model_out",
                site=site,
                round=rnd,
                checksum=pt.state_dict_checksum(params),
                threads=pt.torch.get_num_threads(),
            )
            meta = {"NUM_STEPS_CURRENT_ROUND": int(stats["steps"])}

        emit("sent", site=site, round=rnd)
        flare.send(flare.FLModel(params=params, meta=meta))
