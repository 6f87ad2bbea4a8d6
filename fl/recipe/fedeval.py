"""FLARE's ``FedEvalRecipe``: every site evaluates one model (a checkpoint) and reports its metrics.

The server side is :class:`~fl.workflows.cross_site_eval.CrossSiteModelEval` with the sites' own
models left out: ``cross_site_val/cross_val_results.json`` holds each site's score of the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl.job.fed_job import JobConfigError
from fl.recipe.fedavg import FedAvgRecipe

__all__ = ["FedEvalRecipe"]

#: FLARE's per-site keys of this recipe and the FedAvgRecipe keys they are.
_SITE_KEYS = {"eval_script": "train_script", "eval_args": "train_args"}


class FedEvalRecipe(FedAvgRecipe):
    """``min_clients`` sites run ``eval_script`` on the model ``model`` with weights ``eval_ckpt`` (safetensors).

    The script answers the ``validate`` task (``flare.is_evaluate()``) with its metrics.
    """

    cross_site_evaluation = True

    def __init__(
        self,
        *,
        name: str = "eval",
        model: Any,
        eval_ckpt: str,
        min_clients: int,
        eval_script: str,
        eval_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_expected_format: str = "numpy",
        validation_timeout: float = 6000,
        per_site_config: Mapping[str, Mapping[str, Any]] | None = None,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
    ) -> None:
        if not isinstance(eval_ckpt, str) or not eval_ckpt:
            raise JobConfigError(f"FedEvalRecipe: eval_ckpt (the weights to evaluate) is required, got {eval_ckpt!r}")
        self.validation_timeout = validation_timeout
        sites = None
        if per_site_config:
            sites = {site: {_SITE_KEYS.get(k, k): v for k, v in c.items()} for site, c in per_site_config.items()}
        super().__init__(
            name=name,
            model=model,
            initial_ckpt=eval_ckpt,
            min_clients=min_clients,
            num_rounds=1,
            train_script=eval_script,
            train_args=eval_args,
            launch_external_process=launch_external_process,
            command=command,
            server_expected_format=server_expected_format,
            per_site_config=sites,
            client_memory_gc_rounds=client_memory_gc_rounds,
        )

    def _workflow(self, *, min_clients: int, num_rounds: int) -> Any:
        from fl.workflows.cross_site_eval import CrossSiteModelEval

        return CrossSiteModelEval(validation_timeout=self.validation_timeout, evaluate_site_models=False)
