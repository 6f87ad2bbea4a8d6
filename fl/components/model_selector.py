"""Best-model selection: keep the global model whose sites' key metric is best so far."""

from __future__ import annotations

import math
from typing import Any

from fl.components.base import Component, Events
from fl.fsutil import atomic_write_json, read_json
from fl.rounds import model_label
from fl.workflows.aggregation import weighted_metrics
from fl.workflows.support import keep_best_model

__all__ = ["IntimeModelSelector"]


class IntimeModelSelector(Component):
    """Saves ``best_FL_global_model.pt`` whenever a global model scores a new best ``key_metric``.

    The score of a model version is the weighted mean of the key metric that sites report for it
    (weights: each result's ``NUM_STEPS_CURRENT_ROUND`` times ``aggregation_weights[site]``, default 1).
    ``best_model.json`` holds ``key_metric``, ``score``, ``model_version`` and its ``description``
    (numbering as in :mod:`fl.rounds`); when the job ends with no best model it holds
    ``model_version: null`` and the ``reason``.

    Parameters
    ----------
    key_metric:
        The metric to compare, e.g. ``"accuracy"``.
    negate_key_metric:
        Set for metrics where lower is better (e.g. a loss).
    aggregation_weights:
        Per-site multipliers of the weights.
    persistor_id:
        The persistor that writes the best model checkpoint.
    """

    def __init__(
        self,
        key_metric: str = "accuracy",
        negate_key_metric: bool = False,
        aggregation_weights: dict[str, float] | None = None,
        persistor_id: str = "persistor",
    ) -> None:
        if not key_metric:
            raise ValueError("IntimeModelSelector needs a key_metric")
        self.key_metric = key_metric
        self.negate_key_metric = negate_key_metric
        self.aggregation_weights = dict(aggregation_weights or {})
        self.persistor_id = persistor_id
        self.best: dict[str, Any] | None = None
        self._loaded = False
        self._reported: set[str] = set()  # metric names the sites reported, for "why no best model"

    def _state_path(self, ctx: Any) -> Any:
        return ctx.run_dir / "best_model.json"

    def handle_event(self, event: str, data: dict[str, Any], ctx: Any) -> None:
        if not self._loaded:
            saved = read_json(self._state_path(ctx))
            self.best = saved if saved and saved.get("model_version") is not None else None
            self._loaded = True
        if event == Events.JOB_FINISHED and self.best is None and data.get("status") == "finished":
            self._explain_no_best(ctx)
        if event != Events.MODEL_EVALUATED:
            return
        self._reported.update(k for m in data["site_metrics"].values() for k in m)
        weights = data.get("site_weights", {})
        pairs = [
            (
                {self.key_metric: m.get(self.key_metric)},
                weights.get(site, 1.0) * self.aggregation_weights.get(site, 1.0),
            )
            for site, m in data["site_metrics"].items()
        ]
        score = weighted_metrics(pairs).get(self.key_metric)
        if score is None or not math.isfinite(score):
            ctx.log.warning(
                "model selector: no site reported %r for model version %d", self.key_metric, data["model_version"]
            )
            return
        signed = -score if self.negate_key_metric else score
        best_signed = None if self.best is None else self.best["score"] * (-1 if self.negate_key_metric else 1)
        if best_signed is not None and signed <= best_signed:
            return
        persistor = ctx.components.get(self.persistor_id)
        if persistor is None:
            raise ValueError(f"model selector: no persistor component {self.persistor_id!r}")
        persistor.save_best(ctx, data["model_path"], model_version=data["model_version"], metric=score)
        keep_best_model(ctx.run_dir, data["model_path"])  # the tensors cross-site evaluation scores
        description = model_label(data["model_version"], data.get("num_rounds"))
        self.best = {
            "key_metric": self.key_metric,
            "score": score,
            "model_version": data["model_version"],
            "description": description,
            "file": persistor.best_global_model_file_name,
        }
        atomic_write_json(self._state_path(ctx), self.best)
        ctx.log.info("new best model: %s=%.4g (%s)", self.key_metric, score, description)

    def _explain_no_best(self, ctx: Any) -> None:
        """The job ends without a best model: say why, in the log and in ``best_model.json``."""
        if not self._reported:
            reason = (
                f"the sites sent no metrics with their results, so no model was scored; send "
                f"FLModel(metrics={{{self.key_metric!r}: ...}}) from the training script"
            )
        else:
            reported = ", ".join(sorted(self._reported))
            reason = (
                f"no site reported the key metric {self.key_metric!r} (they reported: {reported}); "
                f"set key_metric to one of those, or send {self.key_metric!r}"
            )
        atomic_write_json(
            self._state_path(ctx),
            {"key_metric": self.key_metric, "score": None, "model_version": None, "reason": reason},
        )
        ctx.log.warning("no best model: %s", reason)
