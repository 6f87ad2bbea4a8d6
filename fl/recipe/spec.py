"""The Recipe API's base: a recipe is a FedJob built from an algorithm's arguments (see :mod:`fl.recipe`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fl.filters.base import Filter
from fl.job.fed_job import SERVER, FedJob, FilterType, JobConfigError

if TYPE_CHECKING:
    from fl.recipe.env import Run

__all__ = ["ExecEnv", "Recipe"]


class ExecEnv(Protocol):
    """Where a recipe runs: :class:`~fl.recipe.env.SimEnv`, ``PocEnv`` or ``ProdEnv``."""

    def deploy(self, job: FedJob) -> Run: ...


class Recipe:
    """A job made from a recipe's arguments; ``execute(env)`` runs it, ``export(dir)`` writes its folder."""

    def __init__(self, job: FedJob) -> None:
        self.job = job
        self.name = job.name

    def execute(self, env: ExecEnv) -> Run:
        """Run the job in ``env``; returns the run (``get_status()``, ``get_result()``)."""
        return env.deploy(self.job)

    def export(self, job_dir: str | os.PathLike[str]) -> Path:
        """Write the job folder under ``job_dir`` (for ``fl simulate`` / ``fl submit``); returns its path."""
        return self.job.export_job(job_dir)

    # ------------------------------------------------------------------ filters (FLARE's Recipe methods)
    def add_client_input_filter(
        self, filter: Filter, tasks: Sequence[str] | None = None, clients: Sequence[str] | None = None
    ) -> None:
        """Filter the tasks' data on the sites (``clients``, default every site app) before the script sees it."""
        self._add_client_filter(filter, FilterType.TASK_DATA, tasks, clients)

    def add_client_output_filter(
        self, filter: Filter, tasks: Sequence[str] | None = None, clients: Sequence[str] | None = None
    ) -> None:
        """Filter the results on the sites (``clients``, default every site app) before they leave."""
        self._add_client_filter(filter, FilterType.TASK_RESULT, tasks, clients)

    def add_server_input_filter(self, filter: Filter, tasks: Sequence[str] | None = None) -> None:
        """Filter the sites' results on the server before the workflow gets them."""
        self.job.to(filter, SERVER, filter_type=FilterType.TASK_RESULT, tasks=_task_list(tasks))

    def add_server_output_filter(self, filter: Filter, tasks: Sequence[str] | None = None) -> None:
        """FLARE's server-side task data filter; fl's server sends the global model as it is, so it is refused."""
        self.job.to(filter, SERVER, filter_type=FilterType.TASK_DATA, tasks=_task_list(tasks))

    def _add_client_filter(
        self, filter: Filter, filter_type: str, tasks: Sequence[str] | None, clients: Sequence[str] | None
    ) -> None:
        if isinstance(clients, str):
            raise JobConfigError(f"clients must be a list of site names, got {clients!r}")
        targets = list(clients) if clients is not None else self.job.client_targets
        if not targets:
            raise JobConfigError(f"recipe {self.name!r} has no site apps to add the filter to")
        for target in targets:
            self.job.to(filter, target, filter_type=filter_type, tasks=_task_list(tasks))


def _task_list(tasks: Sequence[str] | None) -> list[str] | None:
    """FLARE's ``tasks`` argument as the Job API takes it (a string is one task's name)."""
    if tasks is None:
        return None
    return [tasks] if isinstance(tasks, str) else list(tasks)
