"""A DDP training script for tests: 2+ ranks (gloo on CPU, or nccl), one step of SGD per round on FlatModel.

Rank r's loss is sum((w - r)^2), so DDP's averaged gradient is 2 (w - mean rank); with lr 0.25 and 2 ranks a
round maps w to 0.5 w + 0.25 on every rank. Each rank appends one line per round to
EVIDENCE/<site>-rank<r>.jsonl: what it received (a digest), whether it holds a channel to the site, its pid.

--pattern helper: fl.client.distributed.receive_all(); --pattern flare: FLARE's multi-GPU example by hand
(rank 0 asks is_running() and broadcasts it; every rank calls receive(), which is None off rank 0).
"""

import argparse
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fl.client as flare
import fl.client.distributed as fld


class Flat(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))

    def forward(self) -> torch.Tensor:
        return self.weight


def digest(params: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--evidence", required=True)
    parser.add_argument("--pattern", choices=["helper", "flare"], default="helper")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true", help="a rank that only SIGKILL ends")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if args.backend == "nccl" else torch.device("cpu")
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
    flare.init(rank=rank)
    site = flare.get_site_name()
    evidence = Path(args.evidence) / f"{site}-rank{rank}.jsonl"
    evidence.parent.mkdir(parents=True, exist_ok=True)
    print(f"rank {rank} of {dist.get_world_size()} pid {os.getpid()} on {device}", flush=True)

    while True:
        if args.pattern == "helper":
            model = fld.receive_all()
            if model is None:
                break
        else:
            running = [flare.is_running() if rank == 0 else None]
            dist.broadcast_object_list(running, src=0)  # the script's own choice, between its own ranks
            if not running[0]:
                break
            model = flare.receive()
        record = {
            "pid": os.getpid(),
            "talks": flare._context._channel is not None,
            "round": None if model is None else model.current_round,
            "received": None if model is None else digest(model.params),
        }
        net = Flat(16).to(device)
        if model is not None:
            net.load_state_dict(model.params)
        ddp = DDP(net, device_ids=[local_rank] if args.backend == "nccl" else None)  # broadcasts rank 0's weights
        record["synced"] = digest(ddp.module.state_dict())
        if args.sleep:
            print(f"rank {rank} sleeping", flush=True)
            time.sleep(args.sleep)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.25)
        ((ddp() - float(rank)) ** 2).sum().backward()  # DDP averages the gradient over the ranks
        optimizer.step()
        record["trained"] = digest(ddp.module.state_dict())
        with evidence.open("a") as out:
            out.write(json.dumps(record) + "\n")
        if rank == 0:
            flare.send(flare.FLModel(params={k: v.cpu() for k, v in net.state_dict().items()},
                                     meta={"NUM_STEPS_CURRENT_ROUND": 1}))  # fmt: skip
    print(f"rank {rank}: the job ended", flush=True)
    dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main()
