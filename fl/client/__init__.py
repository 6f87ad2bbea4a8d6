"""The Client API: what a training script imports to take part in a federated job.

    import fl.client as flare

    flare.init()
    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params)
        ...  # train
        flare.send(flare.FLModel(params=model.state_dict(), meta={"NUM_STEPS_CURRENT_ROUND": steps}))

The functions act on one default context per process, as NVIDIA FLARE's do, so that porting a
FLARE script means changing its imports.
"""

from __future__ import annotations

from typing import Any

from fl.client.api import ClientAPI, NotUnderAgentError
from fl.client.model import FLMetaKey, FLModel, ParamsType
from fl.client.state import SiteState

__all__ = [
    "FLMetaKey",
    "FLModel",
    "NotUnderAgentError",
    "ParamsType",
    "SiteState",
    "end_status",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_state",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "receive",
    "send",
    "shutdown",
    "system_info",
]

_context = ClientAPI()


def _new_context() -> None:
    """Start this process's next script run afresh (fl.site.warm_worker runs many in one process)."""
    global _context
    old, _context = _context, ClientAPI()
    old.detach()


def init(rank: int | str | None = None) -> None:
    """Connect to the site agent that started this script."""
    _context.init(rank)


def receive(timeout: float | None = None) -> FLModel | None:
    """The next task's model (params, meta with current and total rounds); None when the job ended."""
    return _context.receive(timeout)


def send(model: FLModel, clear_cache: bool = True) -> bool:
    """Send this task's result to the server; returns whether it was accepted."""
    return _context.send(model, clear_cache)


def end_status() -> str | None:
    """Why the task loop ended: "run_over" when only this run's task is done (per-task runs), else the job's end."""
    return _context.end_status()


def is_running() -> bool:
    """True while the job runs (waits for the next task)."""
    return _context.is_running()


def is_train() -> bool:
    return _context.is_train()


def is_evaluate() -> bool:
    return _context.is_evaluate()


def is_submit_model() -> bool:
    return _context.is_submit_model()


def get_site_name() -> str:
    return _context.get_site_name()


def get_job_id() -> str:
    return _context.get_job_id()


def system_info() -> dict[str, Any]:
    """``{"site_name": ..., "job_id": ...}``."""
    return _context.system_info()


def get_config() -> dict[str, Any]:
    return _context.get_config()


def log(key: str, value: Any, data_type: str = "SCALAR", global_step: int | None = None, **kwargs: Any) -> None:
    """Send a metric to the server (what SummaryWriter uses)."""
    _context.log(key, value, data_type, global_step, **kwargs)


def get_state() -> SiteState:
    """This site's state for this job: a dict that survives between the script's runs (per-task mode).

    Tensors and JSON values only (see :mod:`fl.client.state`); saved when a result is sent.
    """
    return _context.get_state()


def shutdown() -> None:
    _context.shutdown()
