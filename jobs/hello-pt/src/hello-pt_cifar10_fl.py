"""Hello PyTorch: the CIFAR10 tutorial's training loop, federated with fl's Client API.

Each round the site receives the global model, measures its accuracy on the local validation set
(the key metric the server's model selector compares), trains locally, and sends back the weights
with the number of steps it took (FedAvg's weight).

Data: ``--dataset cifar10`` loads CIFAR10 with torchvision (downloading it into ``--data-root``);
``--dataset synthetic`` generates an offline dataset of shapes (see offline_data.py); ``auto``
(the default) uses CIFAR10 if it is on disk or can be downloaded, and the offline dataset otherwise.

``--fedprox-mu MU`` adds FedProx's proximal term (fl.client.fedprox.PTFedProxLoss) to the loss
(jobs/fedprox). Cross-site evaluation (jobs/cross-site-eval): a ``validate`` task scores the model
it carries without training; a ``submit_model`` task sends this site's last locally trained model.

What a round leaves behind for the next (the optimizer's momentum, the shuffling generator, the last
local model) is kept in ``flare.get_state()`` too, so the script trains the same whether the site
runs it once for the job or once per task (``launch_once=False``, the simulator's mode for many sites).
"""

import argparse
import copy
import fcntl
import os
import sys

import torch
from simple_network import SimpleNetwork
from torch import nn
from torch.optim import SGD
from torch.utils.data import DataLoader, Subset

import fl.client as flare
from fl.client.fedprox import PTFedProxLoss
from fl.client.tracking import SummaryWriter

DATASET_PATH = os.environ.get("FL_DATA_ROOT", "/tmp/fl/data")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["auto", "cifar10", "synthetic"], default="auto")
    parser.add_argument("--data-root", default=DATASET_PATH, help="where CIFAR10 is (or is downloaded to)")
    parser.add_argument(
        "--train-size", type=int, default=None, help="training samples (default: all of CIFAR10, 2000 synthetic)"
    )
    parser.add_argument(
        "--test-size", type=int, default=None, help="validation samples (default: all of CIFAR10, 500 synthetic)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: 4 for CIFAR10 (the tutorial's), 16 synthetic")
    parser.add_argument(
        "--lr", type=float, help="SGD learning rate; default: 0.001 for CIFAR10 (the tutorial's), 0.02 synthetic"
    )
    parser.add_argument(
        "--fedprox-mu", type=float, default=0.0, help="FedProx's proximal term weight mu (default: 0, plain FedAvg)"
    )
    return parser.parse_args()


# The tutorial's settings for CIFAR10; the small offline dataset learns in fewer, larger steps.
DEFAULTS = {"CIFAR10": {"batch_size": 4, "lr": 0.001}, "synthetic": {"batch_size": 16, "lr": 0.02}}


def load_cifar10(root, download):
    """CIFAR10 train and test sets with the tutorial's transform; one site downloads at a time."""
    from torchvision.datasets import CIFAR10
    from torchvision.transforms import Compose, Normalize, ToTensor

    transform = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".download.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # sites sharing a folder must not download over each other
        train = CIFAR10(root=root, train=True, download=download, transform=transform)
        test = CIFAR10(root=root, train=False, download=download, transform=transform)
    return train, test


def subset(dataset, size, seed):
    if size is None or size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, indices.tolist())


def load_data(args, site_name):
    """(train set, validation set, name of the dataset used)."""
    if args.dataset in ("auto", "cifar10"):
        try:
            train, test = load_cifar10(args.data_root, download=True)
            seed = sum(site_name.encode())
            return subset(train, args.train_size, seed), subset(test, args.test_size, seed + 1), "CIFAR10"
        except Exception as exc:  # no files on disk and no way to download them
            if args.dataset == "cifar10":
                raise SystemExit(
                    f"{site_name}: CIFAR10 is not under {args.data_root} and could not be downloaded: {exc}"
                ) from exc
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(
                f"{site_name}: CIFAR10 is not under {args.data_root} and cannot be downloaded ({reason}); "
                "training on the offline synthetic dataset instead (--dataset cifar10 to insist)",
                flush=True,
            )
    from offline_data import make_dataset

    train = make_dataset(site_name, "train", args.train_size or 2000)
    test = make_dataset(site_name, "test", args.test_size or 500)
    return train, test, "synthetic"


def evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            predicted = model(images).argmax(dim=1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return correct / max(total, 1)


def main():
    args = parse_args()
    model = SimpleNetwork()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    loss_fn = nn.CrossEntropyLoss()

    flare.init()
    site_name = flare.system_info()["site_name"]
    if args.dataset in ("auto", "cifar10"):
        # Don't wait long for a download that cannot happen (machines without internet).
        import socket

        socket.setdefaulttimeout(20)
    train_set, test_set, dataset_name = load_data(args, site_name)
    batch_size = args.batch_size or DEFAULTS[dataset_name]["batch_size"]
    lr = args.lr or DEFAULTS[dataset_name]["lr"]
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9)
    shuffle = torch.Generator().manual_seed(len(train_set))
    state = flare.get_state()  # what an earlier run of this script on this site left (per-task mode)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        shuffle.set_state(state["shuffle"])
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=shuffle)
    test_loader = DataLoader(test_set, batch_size=256, shuffle=False)
    print(
        f"{site_name}: {dataset_name} data, {len(train_set)} training and {len(test_set)} validation samples, "
        f"batch size {batch_size}, lr {lr}, device {device}, {torch.get_num_threads()} threads"
        + (f", FedProx mu {args.fedprox_mu}" if args.fedprox_mu > 0 else ""),
        flush=True,
    )

    fedprox = PTFedProxLoss(mu=args.fedprox_mu) if args.fedprox_mu > 0 else None
    local_weights = state.get("local_weights")  # this site's model after its last local training (submit_model)
    summary_writer = SummaryWriter()
    while flare.is_running():
        input_model = flare.receive()
        if flare.is_submit_model():
            if local_weights is None:  # e.g. the script restarted after training: the server records no model
                print(f"{site_name}: asked for its local model but has not trained one in this run", flush=True)
                flare.send(flare.FLModel(metrics={}))
            else:
                print(f"{site_name}: sending its local model for cross-site evaluation", flush=True)
                flare.send(flare.FLModel(params=local_weights))
            continue
        current_round = input_model.current_round
        model.load_state_dict(input_model.params)
        model.to(device)
        accuracy = evaluate(model, test_loader, device)

        if flare.is_evaluate():
            owner = input_model.meta.get("_model_owner_")
            what = (
                "final validation: accuracy of the global model"
                if owner is None
                else f"cross-site validation: accuracy of {owner}"
            )
            print(f"{site_name}: {what} {accuracy:.4f}", flush=True)
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
            continue
        global_model = copy.deepcopy(model) if fedprox is not None else None
        print(
            f"{site_name}: round {current_round + 1}/{input_model.total_rounds}: "
            f"accuracy of the received global model {accuracy:.4f}",
            flush=True,
        )

        model.train()
        steps = args.epochs * len(train_loader)
        for epoch in range(args.epochs):
            running_loss = 0.0
            for images, labels in train_loader:
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad()
                cost = loss_fn(model(images), labels)
                if fedprox is not None:
                    cost = cost + fedprox(model, global_model)
                cost.backward()
                optimizer.step()
                running_loss += cost.item()
            avg_loss = running_loss / len(train_loader)
            global_step = current_round * args.epochs + epoch
            summary_writer.add_scalar(tag="train_loss", scalar=avg_loss, global_step=global_step)
            print(
                f"{site_name}: round {current_round + 1} epoch {epoch + 1}/{args.epochs} loss {avg_loss:.4f}",
                flush=True,
            )

        local_accuracy = evaluate(model, test_loader, device)
        summary_writer.add_scalar(tag="local_accuracy", scalar=local_accuracy, global_step=current_round)
        print(f"{site_name}: accuracy after local training: {local_accuracy:.4f}", flush=True)
        local_weights = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
        state.update(optimizer=optimizer.state_dict(), shuffle=shuffle.get_state(), local_weights=local_weights)

        flare.send(
            flare.FLModel(
                params=model.cpu().state_dict(),
                # The key metric evaluates the model this site received (the global model), which is
                # what the server's best-model selection compares.
                metrics={"accuracy": accuracy},
                meta={"NUM_STEPS_CURRENT_ROUND": steps},
            )
        )
    if flare.end_status() != "run_over":  # per-task runs end after each task; only the job's end is news
        print(f"{site_name}: job finished", flush=True)


if __name__ == "__main__":
    sys.exit(main())
