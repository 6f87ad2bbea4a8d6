"""What a workflow is written against: tasks out to sites, results back, with deadlines.

A workflow (e.g. :class:`fl.workflows.fedavg.FedAvg`) never sees gRPC. It gets a
:class:`JobContext` whose :class:`Communicator` sends a task to sites and waits, with a deadline
and a minimum count, for their results; the server implements it over the network and tests
implement it in memory.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fl.tensors import Layout

__all__ = [
    "Communicator",
    "Controller",
    "JobAborted",
    "JobContext",
    "RoundFailed",
    "TaskResult",
    "TaskSpec",
]


class RoundFailed(RuntimeError):
    """Too few sites answered a task in time; the message names who was missing and why."""


class JobAborted(RuntimeError):
    """The job was aborted (by an admin or because the server is stopping)."""


@dataclass(frozen=True)
class TaskSpec:
    """A task for sites: its name ("train", "validate", ...), round and the model it carries."""

    name: str
    round: int
    num_rounds: int
    model_path: Path | None = None
    model_layout: Layout | None = None
    #: Checksum of the model file, if the writer computed it (saves reading the file again).
    model_checksum: str | None = None
    params_type: str = "FULL"
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: Whether results must carry params in the model's layout (train), or may carry none.
    expect_params: bool = True
    #: The layout a result's params must have, if not the model's (SCAFFOLD: params + control changes).
    result_layout: Layout | None = None

    @property
    def expected_result_layout(self) -> Layout | None:
        """The layout results are checked against: :attr:`result_layout`, by default the model's."""
        return self.result_layout if self.result_layout is not None else self.model_layout


@dataclass
class TaskResult:
    """One site's answer. ``params_path`` is a checked safetensors file, valid during ``on_result`` only."""

    site: str
    task_id: str
    meta: dict[str, Any]
    metrics: dict[str, Any]
    params_type: str = "FULL"
    params_path: Path | None = None
    error: str | None = None


OnResult = Callable[[TaskResult], None]


class Communicator(Protocol):
    def broadcast_and_wait(
        self,
        task: TaskSpec,
        targets: Sequence[str],
        *,
        min_responses: int,
        timeout: float,
        on_result: OnResult | None = None,
    ) -> list[TaskResult]:
        """Send ``task`` to ``targets``; return the accepted results once all answered, or at the deadline.

        ``on_result`` runs for each result as it arrives (while its params file exists); if it raises,
        that result is refused and counts as missing. Raises :class:`RoundFailed` when fewer than
        ``min_responses`` results were accepted, and :class:`JobAborted` when the job is aborted.
        """
        ...


class JobContext(Protocol):
    """The server-side view of a running job that workflows and components use."""

    job_id: str
    job_name: str
    run_dir: Path
    components: dict[str, Any]
    abort_event: threading.Event

    @property
    def sites(self) -> list[str]:
        """Sites of the job that can take tasks now (connected, not failed)."""

    @property
    def communicator(self) -> Communicator: ...

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

    def wait_for_sites(self, count: int, timeout: float) -> list[str]:
        """Wait until ``count`` sites can take tasks, or the deadline; returns those that can."""

    def fire(self, event: str, **data: Any) -> None:
        """Deliver an event to every component that handles it (``handle_event(event, data, ctx)``)."""

    def save_state(self, state: Mapping[str, Any]) -> None:
        """Persist the workflow's progress atomically (what a resumed job restarts from)."""

    def load_state(self) -> dict[str, Any] | None:
        """The last state saved by :meth:`save_state`, or None for a fresh job."""

    def set_progress(self, *, round: int | None = None, num_rounds: int | None = None, **summary: Any) -> None:
        """Update what ``fl status`` and the simulator's progress display show."""


class Controller(ABC):
    """A server-side workflow: runs the job's rounds through a :class:`JobContext`."""

    _init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from fl.components.base import record_init_args

        obj = super().__new__(cls)
        record_init_args(obj, cls, args, kwargs)
        return obj

    @abstractmethod
    def run(self, ctx: JobContext) -> None: ...
