"""ClientApp: hello-pt's local training (or, in the large scenario, params + 1).

Written the way Flower's quickstart-pytorch writes it: a ``ClientApp`` with an ``@app.train()``
function that loads the received ``ArrayRecord`` into the model, trains, and replies with the
new ``ArrayRecord`` and a ``MetricRecord`` holding ``num-examples`` for FedAvg's weighting.
The training loop, model and data are bench/anchors/pt.py's, shared with every framework.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bench.anchors import pt
from bench.anchors.common import emit

emit("client_start")

app = ClientApp()


def _site(context: Context) -> str:
    # Flower numbers its virtual SuperNodes by partition-id 0..N-1; name them like FLARE's sites.
    return f"site-{int(context.node_config['partition-id']) + 1}"


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    site = _site(context)
    rnd = int(msg.content["config"]["server-round"]) - 1  # Flower counts rounds from 1
    emit("received", site=site, round=rnd)
    arrays = msg.content["arrays"]

    if cfg["scenario"] == "large":
        params = arrays.to_torch_state_dict()
        reply_arrays = ArrayRecord(pt.plus_one(params))
        metrics = {"num-examples": 1}
    else:
        model = pt.SimpleNetwork(seed=None)
        model.load_state_dict(arrays.to_torch_state_dict())
        emit("model_in", site=site, round=rnd, checksum=pt.state_dict_checksum(model.state_dict()))
        dataset = pt.make_dataset(site, "train", int(cfg["train-size"]))
        stats = pt.train(
            model,
            dataset,
            epochs=int(cfg["local-epochs"]),
            batch_size=int(cfg["batch-size"]),
            lr=float(cfg["learning-rate"]),
            momentum=float(cfg["momentum"]),
            seed=pt._stable_seed(site, str(rnd)),
            on_first_step=lambda r=rnd: emit("first_step", site=site, round=r),
        )
        reply_arrays = ArrayRecord(model.state_dict())
        emit(
            "model_out",
            site=site,
            round=rnd,
            checksum=pt.state_dict_checksum(model.state_dict()),
            threads=pt.torch.get_num_threads(),
        )
        metrics = {"num-examples": int(stats["num_examples"]), "train_loss": float(stats["train_loss"])}

    emit("sent", site=site, round=rnd)
    content = RecordDict({"arrays": reply_arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
