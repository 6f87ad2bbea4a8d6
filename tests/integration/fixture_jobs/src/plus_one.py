"""A site script that trains nothing: returns the params it received plus one (numpy or torch).

Options: --nan (send NaN instead), --crash-in-round R (raise in round R), --metric (report accuracy = round),
--spawn-sleeper (start a `sleep 300` child, as a DataLoader would start workers), --count-runs (count this
site's rounds in flare.get_state(), with --state-bytes N bytes of tensor beside the count, and print the count),
--report-pages (print whether a fresh 8 MiB torch tensor is backed by huge pages: AnonHugePages grows).
"""

import argparse
import sys
import time

import fl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--nan", action="store_true")
parser.add_argument("--crash-in-round", type=int, default=-1)
parser.add_argument("--exit-in-round", type=int, default=-1)
parser.add_argument("--metric", action="store_true")
parser.add_argument("--sleep", type=float, default=0.0, help="seconds of 'training' per round")
parser.add_argument("--spawn-sleeper", action="store_true", help="start a child that outlives the script")
parser.add_argument("--count-runs", action="store_true", help="count rounds in the site's state store")
parser.add_argument("--state-bytes", type=int, default=0, help="with --count-runs: a tensor of this many bytes")
parser.add_argument("--report-pages", action="store_true", help="print whether big tensors get huge pages")
args = parser.parse_args()
if args.spawn_sleeper:
    import subprocess

    print(f"sleeper pid {subprocess.Popen(['sleep', '300']).pid}", flush=True)

flare.init()
site = flare.get_site_name()
print(f"{site}: ready", flush=True)
if args.report_pages:
    import os

    import torch

    def huge_kib() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))

    before = huge_kib()
    big = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
    grew = huge_kib() - before >= 2048
    print(f"{site}: huge pages {grew} (THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')})", flush=True)
while flare.is_running():
    model = flare.receive()
    print(f"{site}: round {model.current_round} task {'validate' if flare.is_evaluate() else 'train'}", flush=True)
    if model.current_round == args.crash_in_round:
        print(f"{site}: about to fail on purpose", flush=True)
        raise ZeroDivisionError("deliberate failure for the test")
    if model.current_round == args.exit_in_round:
        sys.exit(3)
    metrics = {"accuracy": float(model.current_round)} if args.metric else None
    if args.count_runs:
        import numpy as np

        state = flare.get_state()
        state["rounds"] = state.get("rounds", 0) + 1
        if args.state_bytes:
            state["ballast"] = np.zeros(args.state_bytes, dtype=np.uint8)
        print(f"{site}: state says round {state['rounds']} of this site", flush=True)
    time.sleep(args.sleep)
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics=metrics))
        continue
    params = {}
    for name, value in model.params.items():
        value = value + 1
        if args.nan:
            value = value * float("nan")
        params[name] = value
    flare.send(flare.FLModel(params=params, metrics=metrics))
print(f"{site}: done", flush=True)
