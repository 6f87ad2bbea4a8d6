"""The Client API for scripts run as ranks of ``torch.distributed.run``: every rank gets what rank 0 received.

Only rank 0 talks to the site (``flare.init(rank=...)``); these helpers hand its answers to every rank
through ``torch.distributed`` collectives of tensors only (never ``broadcast_object_list``, which
pickles): the running state, and the received FLModel (params, params type, rounds, meta and metrics,
the meta as JSON bytes in a uint8 tensor)::

    import fl.client as flare
    import fl.client.distributed as fld

    dist.init_process_group("nccl")            # or "gloo" on CPU
    flare.init(rank=dist.get_rank())
    while (input_model := fld.receive_all()) is not None:   # None on every rank once the job ended
        net.load_state_dict(input_model.params)
        ...                                    # DDP training on every rank
        if dist.get_rank() == 0:
            flare.send(flare.FLModel(params=net.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": steps}))

No collective waits longer than ``poll_s``: rank 0 waits for the next task in steps and tells the other
ranks after each, so a slow round elsewhere in the federation never runs into the process group's timeout.
FLARE's by-hand pattern (rank 0 asks ``flare.is_running()`` and broadcasts it; other ranks get None from
``flare.receive()``) works too.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import fl.client as flare
from fl.client.model import FLModel

__all__ = ["POLL_S", "broadcast_model", "is_running", "receive_all"]

#: Seconds rank 0 waits for the next task between two broadcasts (well below any process group timeout).
POLL_S = 30.0
#: States rank 0 broadcasts: a task (or model) follows, the job ended, still waiting, the wait timed out, an error.
_TASK, _ENDED, _WAITING, _TIMEOUT, _ERROR = 1, 0, 2, 3, 4


def is_running(src: int = 0, poll_s: float = POLL_S) -> bool:
    """Rank ``src``'s ``flare.is_running()`` on every rank (blocks until the next task or the job's end)."""
    return _wait_for_task(src, None, poll_s) == _TASK


def receive_all(timeout: float | None = None, src: int = 0, poll_s: float = POLL_S) -> FLModel | None:
    """The FLModel that rank ``src`` receives, on every rank; None on every rank once the job has ended (or
    when no task came within ``timeout`` seconds)."""
    if _wait_for_task(src, timeout, poll_s) != _TASK:
        return None
    return broadcast_model(flare.receive() if dist.get_rank() == src else None, src)


def broadcast_model(model: FLModel | None, src: int = 0) -> FLModel | None:
    """``model`` of rank ``src`` (None there: None everywhere) as a new FLModel on every other rank.

    Params come back as they were on ``src`` (torch tensors on the CPU, or NumPy arrays); an FLModel
    that cannot travel (params that are not tensors, meta that is not JSON) raises on every rank alike.
    """
    if dist.get_rank() == src:
        return _send_model(model, src)
    state, header = _recv_header(src)
    if state == _ENDED:
        return None
    if state == _ERROR:
        raise ValueError(f"fl.client.distributed.broadcast_model: rank {src}: {header['error']}")
    params: dict[str, Any] | None = None
    if header["params"] is not None:
        params = {}
        device = _device()
        for name, dtype, shape, kind in header["params"]:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.broadcast(tensor, src)
            params[name] = tensor.cpu().numpy() if kind == "numpy" else tensor.cpu()
    return FLModel(
        params_type=header["params_type"],
        params=params,
        metrics=header["metrics"],
        current_round=header["current_round"],
        total_rounds=header["total_rounds"],
        meta=header["meta"],
    )


def _wait_for_task(src: int, timeout: float | None, poll_s: float) -> int:
    """_TASK, _ENDED or _TIMEOUT, the same on every rank: rank ``src`` waits in steps of ``poll_s`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = _WAITING
        if dist.get_rank() == src:
            left = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            ready = flare._context.wait_for_task(left)
            if ready is not None:
                state = _TASK if ready else _ENDED
            elif deadline is not None and time.monotonic() >= deadline:
                state = _TIMEOUT
        state = _broadcast_ints([state], src)[0]
        if state != _WAITING:
            return state


def _send_model(model: FLModel | None, src: int) -> FLModel | None:
    """Rank ``src``'s side of :func:`broadcast_model`: the header, then each tensor."""
    if model is None:
        _send_header(_ENDED, {}, src)
        return None
    try:
        tensors, header = _describe(model)
    except (TypeError, ValueError) as exc:
        _send_header(_ERROR, {"error": str(exc)}, src)
        raise
    _send_header(_TASK, header, src)
    device = _device()
    for tensor in tensors:
        dist.broadcast(tensor.to(device).contiguous(), src)
    return model


def _describe(model: FLModel) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The tensors of ``model``'s params and the JSON header that lets other ranks rebuild it."""
    tensors: list[torch.Tensor] = []
    described: list[tuple[str, str, list[int], str]] | None = None
    if model.params is not None:
        described = []
        for name, value in dict(model.params).items():
            kind = "numpy" if isinstance(value, np.ndarray) else "torch"
            if kind == "numpy":
                value = torch.from_numpy(np.ascontiguousarray(value))
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"params[{name!r}] is a {type(value).__name__}, not a tensor or array")
            tensors.append(value.detach())
            described.append((str(name), str(value.dtype).removeprefix("torch."), list(value.shape), kind))
    header = {
        "params_type": getattr(model.params_type, "value", model.params_type),
        "params": described,
        "metrics": model.metrics,
        "current_round": model.current_round,
        "total_rounds": model.total_rounds,
        "meta": model.meta,
    }
    json.dumps(header, allow_nan=False)  # a ValueError/TypeError here, before any rank waits for tensors
    return tensors, header


def _send_header(state: int, header: dict[str, Any], src: int) -> None:
    data = json.dumps(header, allow_nan=False).encode()
    _broadcast_ints([state, len(data)], src)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_device()), src)


def _recv_header(src: int) -> tuple[int, dict[str, Any]]:
    state, size = _broadcast_ints([0, 0], src)
    data = torch.empty(size, dtype=torch.uint8, device=_device())
    dist.broadcast(data, src)
    return state, json.loads(bytes(data.cpu().numpy().tobytes()).decode()) if size else {}


def _broadcast_ints(values: list[int], src: int) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64, device=_device())
    dist.broadcast(tensor, src)
    return [int(v) for v in tensor.tolist()]


def _device() -> torch.device:
    """Where collectives' tensors live: the current CUDA device under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
