#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and PyTorch: fl's paths that touch CUDA.
#   scripts/gpu-check.sh OUT_DIR
# 1. torch sees the GPU; a FLModel's CUDA tensors go through safetensors and the checkpoint writer.
# 2. hello-pt in the simulator trains on the GPU (both sites on device 0), and its accuracy rises.
# 3. The 1 GiB model benchmark (sites return params + 1), on a machine with more cores than CI's.
# 4. Multi-GPU sites: 2 sites each running the DDP test script as ranks of torch.distributed.run with the
#    NCCL backend, 2 ranks on a machine with >= 2 GPUs, 1 rank with 1 GPU; only rank 0 talks to its site.
# Without a CUDA GPU it stops at once, saying so (exit 2).
# Packages missing on the machine may be given as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/fl-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
step() { echo; echo "== $1"; }

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False, or no torch): nothing checked;" \
        "run it by hand on a machine with an NVIDIA GPU" >&2
    exit 2
fi

step "GPU and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 - <<'PY'
import sys, torch, grpc, google.protobuf, safetensors
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "safetensors", safetensors.__version__)
PY

step "CUDA tensors through safetensors, aggregation and the .pt writer"
python3 - <<'PY'
import tempfile, torch
from pathlib import Path
from fl.tensors import write_tensors, load_torch, open_tensors, iter_blocks
from fl.workflows.aggregation import weighted_average
from fl.components.torch_format import write_pt
d = Path(tempfile.mkdtemp())
state = {"w": torch.randn(1024, 1024, device="cuda"), "h": torch.randn(7, device="cuda").half(),
         "bf": torch.randn(5, device="cuda").bfloat16(), "n": torch.tensor(3, device="cuda")}
layout = write_tensors(d / "m.safetensors", state)  # straight from GPU memory
back = load_torch(d / "m.safetensors")
assert all(torch.equal(back[k], v.cpu()) for k, v in state.items())
avg = weighted_average([(state, 1.0), ({k: v * 3 for k, v in state.items()}, 1.0)])
assert torch.allclose(torch.from_numpy(avg["w"]), (state["w"] * 2).cpu())
f, layout, off = open_tensors(d / "m.safetensors")
write_pt(d / "m.pt", layout, lambda s: (b.tobytes() for _, b in iter_blocks(f, s, off)), {"round": 0})
pt = torch.load(d / "m.pt", weights_only=True, map_location="cuda")
assert all(torch.equal(pt["model"][k], v) for k, v in state.items())
print("ok: CUDA tensors round-trip bit-exactly; checkpoint loads onto the GPU")
PY

step "hello-pt on the GPU in the simulator (2 sites, 2 rounds, offline data)"
start=$(date +%s.%N)
python3 jobs/hello-pt/job.py --workspace /tmp/fl-gpu-hello --dataset synthetic 2>&1 | tee "$OUT/hello-pt.log" \
    | grep -E "device|accuracy:|finished in|failed"
echo "hello-pt wall: $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
grep -q "device cuda:0" "$OUT/hello-pt.log" && echo "ok: sites trained on cuda:0" || echo "FAIL: sites did not use the GPU"

step "1 GiB model through 2 rounds (fl side of the benchmark)"
python3 bench/fl_side/large.py --mib 1024 --timeout 400 2>"$OUT/large.err" | tee "$OUT/large.json" | python3 -c "
import json, sys
d = json.load(sys.stdin)
print({k: d.get(k) for k in ('status', 'seconds_per_round', 'first_cycle_seconds', 'peak_server_rss_gib', 'peak_pss_gib', 'final_check')})"
nproc; free -g | head -2

step "Multi-GPU sites: the DDP job with the NCCL backend under torch.distributed.run"
RANKS=$(python3 -c "import torch; print(min(torch.cuda.device_count(), 2))")
echo "GPUs: $(python3 -c 'import torch; print(torch.cuda.device_count())'); ranks per site: $RANKS (nccl)"
rm -rf "$OUT/ddp-evidence" /tmp/fl-gpu-ddp
RANKS=$RANKS EVIDENCE="$OUT/ddp-evidence" python3 - <<'PY' 2>&1 | tee "$OUT/ddp.log" | grep -E "ranks|rank [0-9] of|ok:|FAIL|finished in|failed"
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, os.path.abspath("tests/integration/fixture_jobs"))
os.chdir("tests/integration/fixture_jobs")
from src.models import FlatModel
from fl.job import FedJob, ScriptRunner
from fl.simulator import simulate
from fl.workflows.fedavg import FedAvg
ranks, evidence = int(os.environ["RANKS"]), Path(os.environ["EVIDENCE"])
command = f"python3 -m torch.distributed.run --nnodes=1 --nproc_per_node={ranks}"  # FLARE's spelling; a free port is added
job = FedJob(name="ddp-nccl", min_clients=2)
job.to(FedAvg(num_clients=2, num_rounds=2), "server")
job.to(FlatModel(16), "server")
for site, pattern in (("site-1", "helper"), ("site-2", "flare")):
    args = f"--backend nccl --pattern {pattern} --evidence {evidence}"
    job.to(ScriptRunner(script="src/ddp_train.py", script_args=args, command=command, framework="pytorch"), site)
print(f"ran: 2 sites x {ranks} nccl ranks: {command} src/ddp_train.py (site-1 fl.client.distributed, site-2 FLARE's by hand)")
code = simulate(job.export_job("/tmp/fl-gpu-ddp/export"), "/tmp/fl-gpu-ddp/ws", progress=False)
run = Path("/tmp/fl-gpu-ddp/ws/latest")  # this run's job folder
final = torch.load(run / "FL_global_model.pt", weights_only=True)["model"]["weight"]
expected = 0.75 * (ranks - 1) / 2  # w -> 0.5 w + 0.5 * mean rank, twice, from 0
ok = code == 0 and torch.allclose(final, torch.full((16,), expected))
for site in ("site-1", "site-2"):
    records = [[json.loads(line) for line in (evidence / f"{site}-rank{r}.jsonl").read_text().splitlines()] for r in range(ranks)]
    ok &= all(len(r) == 2 for r in records) and [x["talks"] for x in records[0]] == [True, True]
    ok &= all(not x["talks"] for r in records[1:] for x in r)
    ok &= all([x["trained"] for x in r] == [x["trained"] for x in records[0]] for r in records)
print(("ok: " if ok else "FAIL: ") + f"simulate exit {code}, final weight {final[0].item()} (expected {expected}), "
      "only rank 0 talked, every rank trained the same model each round")
sys.exit(0 if ok else 1)
PY
