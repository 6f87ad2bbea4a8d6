"""``add_experiment_tracking`` and ``add_cross_site_evaluation`` (FLARE's ``nvflare.recipe.utils``)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
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


def add_cross_site_evaluation(
    recipe: Recipe,
    submit_model_timeout: float = 600,
    validation_timeout: float = 6000,
    participating_clients: Sequence[str] | None = None,
) -> None:
    """After the recipe's training, every site evaluates the global model and every site's local model.

    Adds :class:`~fl.workflows.cross_site_eval.CrossSiteModelEval` to the server; the sites' script must
    answer ``validate`` (``flare.is_evaluate()``) and ``submit_model`` (``flare.is_submit_model()``).
    Once per recipe: a second call (or a call on a recipe that evaluates already) raises RuntimeError.
    """
    from fl.workflows.cross_site_eval import CrossSiteModelEval

    if getattr(recipe, "cross_site_evaluation", False):
        raise RuntimeError(f"add_cross_site_evaluation: recipe {recipe.name!r} has cross-site evaluation already")
    workflow = CrossSiteModelEval(
        submit_model_timeout=submit_model_timeout,
        validation_timeout=validation_timeout,
        participating_clients=participating_clients,
    )
    recipe.job.to(workflow, "server", id="cross_site_eval")
    recipe.cross_site_evaluation = True  # type: ignore[attr-defined]
