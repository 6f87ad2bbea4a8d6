#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and PyTorch: fl's paths that touch CUDA.
#   scripts/gpu-check.sh OUT_DIR
# 1. torch sees the GPU; a FLModel's CUDA tensors go through safetensors and the checkpoint writer.
# 2. hello-pt in the simulator trains on the GPU (both sites on device 0), and its accuracy rises.
# 3. The 1 GiB model benchmark (sites return params + 1), on a machine with more cores than CI's.
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
