"""The reference for the real-training scenario: FedAvg written as a plain PyTorch loop.

No framework: each site trains on its data with the same code, seeds and batches as the
frameworks' clients (bench/anchors/pt.py), the weights are averaged by steps in float32, and the
final model is evaluated the same way. A framework that does FedAvg right lands within noise of
this (the last bits of an average depend on the order of the arithmetic).

    python -m bench.plain        # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def run(
    sites: int, rounds: int, train_size: int, val_size: int, epochs: int, batch_size: int, lr: float
) -> dict[str, Any]:
    import torch

    from bench.anchors import pt

    torch.set_num_threads(1)
    started = time.perf_counter()
    names = [f"site-{i}" for i in range(1, sites + 1)]
    data = {s: pt.make_dataset(s, "train", train_size) for s in names}
    global_state = pt.SimpleNetwork(seed=0).state_dict()
    for rnd in range(rounds):
        updates = []
        for site in names:
            model = pt.SimpleNetwork(seed=None)
            model.load_state_dict(global_state)
            stats = pt.train(
                model, data[site], epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9,
                seed=pt._stable_seed(site, str(rnd)),
            )  # fmt: skip
            updates.append((model.state_dict(), float(stats["steps"])))
        total = sum(w for _, w in updates)
        global_state = {
            k: sum(state[k].float() * w for state, w in updates) / total if state[k].is_floating_point() else state[k]
            for k, state in ((k, updates[0][0]) for k in updates[0][0])
        }
    out = pt.evaluate_global(global_state, names, val_size)
    out["wall_s"] = round(time.perf_counter() - started, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.anchors.common import SCENARIOS

    defaults = SCENARIOS["train"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in ("sites", "rounds", "train_size", "val_size", "epochs", "batch_size", "lr"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(defaults[key]), default=defaults[key])
    args = ap.parse_args(argv)
    result = run(args.sites, args.rounds, args.train_size, args.val_size, args.epochs, args.batch_size, args.lr)
    print(json.dumps({"anchor": "plain-pytorch", "scenario": "train", "status": "ok", **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
