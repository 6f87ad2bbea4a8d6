"""What a round-engine job resumes from after a server restart, and how it is written after each round.

The job's saved state (``ctx.save_state``, JSON) names files; the tensors themselves are safetensors
in the job's ``models/``: ``global-rNNNN.safetensors`` (the global model after round NNNN) and
``strategy-rNNNN.safetensors`` (the strategy's own tensors, e.g. optimizer moments, if it keeps any).
Nothing is pickled, and a state is written only after the files it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl.tensors import load_numpy, write_tensors
from fl.workflows.base import JobContext

__all__ = ["RoundState", "write_strategy_state"]


@dataclass(frozen=True)
class RoundState:
    """Where an engine job stands between rounds (see the module)."""

    #: the 0-based round to run next
    next_round: int
    #: the global model to start it from; None: the persistor's initial model (a fresh job)
    model_path: Path | None = None
    #: the strategy's tensors after the last completed round; None: it keeps none (or a fresh job)
    strategy_file: Path | None = None
    #: whether the sites sent metrics with their results (decides the final validation)
    sites_report_metrics: bool = False

    @classmethod
    def load(cls, ctx: JobContext, start_round: int) -> RoundState:
        """The saved state of this job, or a fresh one starting at ``start_round``."""
        saved = ctx.load_state() or {}
        models = ctx.run_dir / "models"
        return cls(
            next_round=int(saved.get("next_round", start_round)),
            model_path=models / saved["model_file"] if saved.get("model_file") else None,
            strategy_file=models / saved["strategy_file"] if saved.get("strategy_file") else None,
            sites_report_metrics=bool(saved.get("sites_report_metrics", False)),
        )

    @property
    def resumed(self) -> bool:
        """Whether a completed round's model is where the job goes on from."""
        return self.model_path is not None

    def strategy_arrays(self) -> dict[str, np.ndarray]:
        """The strategy's saved tensors (empty when it saved none)."""
        return load_numpy(self.strategy_file) if self.strategy_file else {}

    def save(self, ctx: JobContext) -> None:
        """Record this state (the files it names are written already)."""
        if self.model_path is None:
            raise ValueError("a saved round state names the global model it goes on from")
        state: dict[str, Any] = {
            "next_round": self.next_round,
            "model_file": self.model_path.name,
            "sites_report_metrics": self.sites_report_metrics,
        }
        if self.strategy_file is not None:
            state["strategy_file"] = self.strategy_file.name
        ctx.save_state(state)


def write_strategy_state(ctx: JobContext, rnd: int, arrays: dict[str, np.ndarray]) -> Path | None:
    """Write a strategy's resumable tensors for the state after round ``rnd``; None if it keeps none."""
    if not arrays:
        return None
    path = ctx.run_dir / "models" / f"strategy-r{rnd + 1:04d}.safetensors"
    write_tensors(path, arrays, {"round": str(rnd), "job_id": ctx.job_id})
    return path
