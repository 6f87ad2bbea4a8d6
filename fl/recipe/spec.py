"""The Recipe API's base: a recipe is a FedJob built from an algorithm's arguments (see :mod:`fl.recipe`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fl.job.fed_job import FedJob

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
