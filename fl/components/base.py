"""The component interface: components react to a job's events."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["Component", "Events"]


class Events:
    """Events a server-side job fires (``ctx.fire(name, **data)``)."""

    JOB_STARTED = "job_started"
    ROUND_STARTED = "round_started"
    RESULT_RECEIVED = "result_received"
    #: A global model version was evaluated by the sites: model_version, model_path, site_metrics, metrics.
    MODEL_EVALUATED = "model_evaluated"
    ROUND_COMPLETED = "round_completed"
    #: Metrics a site's SummaryWriter sent: site, records.
    ANALYTICS = "analytics"
    JOB_FINISHED = "job_finished"


def record_init_args(obj: Any, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Remember the arguments a component was built with (what ``FedJob.export_job`` writes)."""
    try:
        bound = inspect.signature(cls).bind_partial(*args, **kwargs)
    except TypeError:
        return  # __init__ raises the real error
    arguments = dict(bound.arguments)
    for name, param in inspect.signature(cls).parameters.items():
        if param.kind is param.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))  # exported as the keyword arguments they are
    obj._init_args = arguments


class Component:
    """Base for components; override :meth:`handle_event` for the events of interest."""

    _init_args: dict[str, Any]
    #: Constructor arguments that name input files: the server resolves them inside the job folder
    #: or one of its data roots (fl server --data-root), and refuses the job at submit otherwise.
    file_args: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        record_init_args(obj, cls, args, kwargs)
        return obj

    def handle_event(self, event: str, data: dict[str, Any], ctx: Any) -> None:
        """Called for every event of the job; the default ignores them."""

    def job_code_needed(self, app_dir: Path) -> str | None:
        """Why this component, whose arguments name the job's code, needs that code on the server host.

        None: it can do without (the server's policy may refuse the job's code: --no-custom-code).
        """
        return "its arguments name the job's code, which it would run on the server host"
