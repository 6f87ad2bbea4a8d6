"""Where the server's models of a job are: the current global model and the best one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl.components.base import Component

__all__ = ["PTFileModelLocator"]


class PTFileModelLocator(Component):
    """Names and paths of the checkpoints that the persistor ``pt_persistor_id`` wrote."""

    def __init__(self, pt_persistor_id: str = "persistor") -> None:
        self.pt_persistor_id = pt_persistor_id

    def locate(self, ctx: Any) -> dict[str, Path]:
        persistor = ctx.components.get(self.pt_persistor_id)
        if persistor is None:
            raise ValueError(f"model locator: no persistor component {self.pt_persistor_id!r}")
        found = {
            "FL_global_model": persistor.global_model_path(ctx),
            "best_FL_global_model": persistor.best_model_path(ctx),
        }
        return {name: path for name, path in found.items() if path.exists()}
