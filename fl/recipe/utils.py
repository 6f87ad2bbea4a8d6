"""``add_experiment_tracking`` and ``add_cross_site_evaluation`` (FLARE's ``nvflare.recipe.utils``)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from fl.job.fed_job import JobConfigError
from fl.recipe.spec import Recipe

__all__ = ["add_cross_site_evaluation", "add_experiment_tracking"]

#: The server-side receiver of each tracking type (TensorBoard's comes with every job).
RECEIVERS = {
    "mlflow": "fl.components.mlflow_receiver.MLflowReceiver",
    "wandb": "fl.components.wandb_receiver.WandBReceiver",
}


def add_experiment_tracking(recipe: Recipe, tracking_type: str = "tensorboard", tracking_config: Any = None) -> None:
    """Collect the sites' metrics on the server: ``tensorboard`` (always on in fl), ``mlflow`` or ``wandb``."""
    if tracking_type == "tensorboard":
        return  # every FedJob has the TensorBoard receiver (fed.analytix_log_stats -> server tb_events)
    path = RECEIVERS.get(tracking_type)
    if path is None:
        raise JobConfigError(f"tracking_type {tracking_type!r}: one of tensorboard, {', '.join(RECEIVERS)}")
    module_name, _, name = path.rpartition(".")
    if importlib.util.find_spec(module_name) is None:
        raise JobConfigError(f"tracking_type {tracking_type!r}: this fl has no {path} yet")
    receiver = getattr(importlib.import_module(module_name), name)(**(tracking_config or {}))
    recipe.job.to(receiver, "server", id=f"{tracking_type}_receiver")


def add_cross_site_evaluation(recipe: Recipe, **kwargs: Any) -> None:
    """FLARE's cross-site evaluation after training; refused until fl has the workflow."""
    raise NotImplementedError(
        "add_cross_site_evaluation: fl has no cross-site evaluation workflow (CrossSiteModelEval) yet"
    )
