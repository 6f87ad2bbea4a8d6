"""Validation JSON: every site's metrics for every global model, in one file in the job's folder."""

from __future__ import annotations

from typing import Any

from fl.components.base import Component, Events
from fl.fsutil import atomic_write_json, read_json
from fl.rounds import model_label

__all__ = ["ValidationJsonGenerator"]


class ValidationJsonGenerator(Component):
    """Writes ``validation.json``: ``{"models": [{model_version, description, sites, aggregate}]}``.

    Model version 0 is the initial model; version ``v`` is the global model after round v/N (see
    :mod:`fl.rounds`); ``evaluated_in_round`` is the round index (``current_round``) of the tasks
    whose results carried the metrics (N: the final validation).
    """

    def __init__(self, results_dir: str = "", json_file_name: str = "validation.json") -> None:
        if "/" in json_file_name or "\\" in json_file_name or not json_file_name:
            raise ValueError(f"json_file_name must be a plain file name, got {json_file_name!r}")
        if ".." in results_dir.split("/"):
            raise ValueError("results_dir must stay inside the job's folder")
        self.results_dir = results_dir
        self.json_file_name = json_file_name

    def path(self, ctx: Any) -> Any:
        return ctx.run_dir / self.results_dir / self.json_file_name

    def handle_event(self, event: str, data: dict[str, Any], ctx: Any) -> None:
        if event != Events.MODEL_EVALUATED:
            return
        path = self.path(ctx)
        doc = read_json(path) or {"job_id": ctx.job_id, "models": []}
        version = data["model_version"]
        doc["models"] = [m for m in doc["models"] if m["model_version"] != version]
        doc["models"].append(
            {
                "model_version": version,
                "description": model_label(version, data.get("num_rounds")),
                "evaluated_in_round": data["round"],
                "sites": data["site_metrics"],
                "aggregate": data["metrics"],
            }
        )
        doc["models"].sort(key=lambda m: m["model_version"])
        atomic_write_json(path, doc)
