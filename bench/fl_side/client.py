"""fl training script (Client API) for the benchmark: the same work as the anchors' clients.

``flare.init()``, then ``while flare.is_running(): receive -> local work -> send``, with the local
work from bench/anchors/pt.py (hello-pt's training loop, or params + 1 in the large scenario) and
the same timestamped events as the anchors' scripts.
"""

import argparse

import fl.client as flare
from bench.anchors import pt
from bench.anchors.common import emit


def main() -> None:
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
            emit("model_out", site=site, round=rnd, checksum=pt.state_dict_checksum(params))
            meta = {"NUM_STEPS_CURRENT_ROUND": int(stats["steps"])}

        emit("sent", site=site, round=rnd)
        flare.send(flare.FLModel(params=params, meta=meta))


if __name__ == "__main__":
    main()
