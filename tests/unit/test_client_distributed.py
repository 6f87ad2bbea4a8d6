"""fl.client.distributed with the gloo backend, 2 ranks spawned on the CPU: every rank gets rank 0's FLModel
(params, meta, rounds) and running state through tensor collectives, and only rank 0 talks to the site."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl.channel import ChannelListener
from fl.site.launch import free_port
from fl.tensors import write_tensors

pytestmark = pytest.mark.timeout(240)

COMMON = """\
import hashlib, json, os, sys
import numpy as np, torch, torch.distributed as dist
import fl.client as flare
import fl.client.distributed as fld
dist.init_process_group("gloo")
rank = dist.get_rank()
out = {"rank": rank}

def digest(params):
    h = hashlib.sha256()
    for name in sorted(params):
        value = params[name]
        if isinstance(value, torch.Tensor):
            h.update(str(value.dtype).encode()); value = value.contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(name.encode()); h.update(str(value.dtype).encode()); h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()
"""

BROADCAST = (
    COMMON
    + """
model = None
if rank == 0:
    model = flare.FLModel(
        params={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.ones(3, dtype=torch.bfloat16),
                "n": torch.tensor(7), "a": np.array([1.5, 2.5])},
        params_type="FULL", metrics={"accuracy": 0.5}, current_round=3, total_rounds=5,
        meta={"nested": {"k": [1, "x"]}},
    )
got = fld.broadcast_model(model)
out["model"] = {"digest": digest(got.params), "kinds": {k: type(v).__name__ for k, v in got.params.items()},
                "round": got.current_round, "total": got.total_rounds, "meta": got.meta, "metrics": got.metrics,
                "type": got.params_type.value}
out["none"] = fld.broadcast_model(None) is None
try:
    fld.broadcast_model(flare.FLModel(params={"bad": "text"}) if rank == 0 else None)
except (TypeError, ValueError) as exc:
    out["error"] = str(exc)
dist.barrier()
print(json.dumps(out), flush=True)
dist.destroy_process_group()  # a gloo group left to exit can abort the process (SIGABRT)
"""
)

RECEIVE_LOOP = (
    COMMON
    + """
flare.init()
rounds = []
while fld.is_running(poll_s=0.2):
    model = fld.receive_all(poll_s=0.2)
    rounds.append({"round": model.current_round, "digest": digest(model.params), "meta": model.meta["note"]})
    if rank == 0:
        flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}))
out["rounds"] = rounds
out["after_end"] = fld.receive_all(poll_s=0.2) is None
out["talks"] = flare._context._channel is not None
out["site"] = flare.get_site_name()
dist.barrier()
print(json.dumps(out), flush=True)
dist.destroy_process_group()  # a gloo group left to exit can abort the process (SIGABRT)
"""
)


def _run_ranks(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``code`` as 2 gloo ranks; the JSON each prints last."""
    script = tmp_path / "ranks.py"
    script.write_text(code)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        rank_env = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        rank_env.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
        procs.append(subprocess.Popen([sys.executable, str(script)], env=rank_env, stdout=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, stdout
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return outputs


def test_broadcast_model_gives_every_rank_rank_0s_params_meta_and_rounds(tmp_path):
    rank0, rank1 = _run_ranks(BROADCAST, tmp_path)
    assert rank0["model"] == rank1["model"]
    assert rank1["model"]["kinds"] == {"w": "Tensor", "h": "Tensor", "n": "Tensor", "a": "ndarray"}
    assert (rank1["model"]["round"], rank1["model"]["total"], rank1["model"]["type"]) == (3, 5, "FULL")
    assert rank1["model"]["meta"] == {"nested": {"k": [1, "x"]}} and rank1["model"]["metrics"] == {"accuracy": 0.5}
    assert rank0["none"] and rank1["none"]
    # A model that cannot travel raises on every rank: no rank waits forever for tensors that never come.
    assert "params['bad'] is a str" in rank0["error"]
    assert "rank 0: params['bad'] is a str" in rank1["error"]


class _FakeAgent:
    """The site's side of the channel: one 'still waiting', two tasks, then the end; counts connections."""

    def __init__(self, listener: ChannelListener, model_path: Path) -> None:
        self.listener = listener
        self.model_path = model_path
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        accepted = self.listener.accept(lambda: True)
        assert accepted is not None
        channel, hello = accepted
        self.requests.append(hello)
        channel.send({"op": "welcome", "site_name": "site-1", "job_id": "j1"})
        replies: list[dict[str, Any]] = [{"op": "timeout"}]
        for round_ in (0, 1):
            task = {"task_id": f"t{round_}", "name": "train", "round": round_, "num_rounds": 2,
                    "meta": {"note": f"r{round_}"}, "model_path": str(self.model_path),
                    "result_path": str(self.model_path.parent / f"result-{round_}.safetensors")}  # fmt: skip
            replies += [{"op": "task", "task": task}, {"op": "ack", "accepted": True}]
        replies.append({"op": "end", "status": "finished", "message": ""})
        for reply in replies:
            self.requests.append(channel.recv())
            channel.send(reply)
        channel.close()


def test_receive_all_and_is_running_agree_on_every_rank_and_only_rank_0_connects(tmp_path):
    model_path = tmp_path / "task.safetensors"
    write_tensors(model_path, {"w": np.arange(4, dtype=np.float32)})
    listener = ChannelListener(tmp_path)
    agent = _FakeAgent(listener, model_path)
    env = {"FL_CHANNEL_PATH": str(listener.path), "FL_CHANNEL_TOKEN": listener.token, "FL_SITE_NAME": "site-1"}
    rank0, rank1 = _run_ranks(RECEIVE_LOOP, tmp_path, env)
    agent.thread.join(10)
    assert rank0["rounds"] == rank1["rounds"] and [r["round"] for r in rank0["rounds"]] == [0, 1]
    assert [r["meta"] for r in rank1["rounds"]] == ["r0", "r1"]
    assert rank0["after_end"] and rank1["after_end"]
    assert (rank0["talks"], rank1["talks"]) == (True, False)
    assert rank1["site"] == "site-1"
    assert agent.requests[0]["rank"] == 0
    ops = [r["op"] for r in agent.requests]
    assert ops == ["hello", "next_task", "next_task", "result", "next_task", "result", "next_task"], ops
    assert not listener.path.exists()  # one connection, then the socket is gone
