"""Experiment tracking from a training script: the values reach the server's receivers.

``SummaryWriter`` (TensorBoard's API), ``MLflowWriter`` (MLflow's) and ``WandBWriter`` (W&B's) send
what they are given to the server, where the job's receivers write it: TensorBoard event files
(TBAnalyticsReceiver), an MLflow tracking server (MLflowReceiver), W&B (WandBReceiver). A script
never talks to a tracking server itself, as in NVIDIA FLARE.
"""

from __future__ import annotations

from typing import Any

import fl.client as _api

__all__ = ["MLflowWriter", "SummaryWriter", "WandBWriter"]


class SummaryWriter:
    """A TensorBoard-style writer whose points are sent to the server (``tb_events/<site>/``)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        # Arguments of torch's SummaryWriter (log_dir, ...) are accepted and ignored: the server
        # decides where the events are written.
        pass

    def add_scalar(self, tag: str, scalar: Any, global_step: int | None = None, **kwargs: Any) -> None:
        _api.log(tag, scalar, "SCALAR", global_step, **kwargs)

    def add_scalars(self, tag: str, scalars: dict[str, Any], global_step: int | None = None, **kwargs: Any) -> None:
        _api.log(tag, scalars, "SCALARS", global_step, **kwargs)

    def flush(self) -> None:
        """Points are sent as they are added; nothing to flush."""

    def close(self) -> None:
        pass


class MLflowWriter:
    """MLflow's logging calls (``mlflow.log_metric`` ...), sent to the server's MLflowReceiver (one run per site)."""

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        _api.log(key, value, "METRIC", step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _api.log("metrics", metrics, "METRICS", step)

    def log_param(self, key: str, value: Any) -> None:
        _api.log(key, value, "PARAMETER")

    def log_params(self, values: dict[str, Any]) -> None:
        _api.log("params", values, "PARAMETERS")

    def set_tag(self, key: str, tag: Any) -> None:
        _api.log(key, tag, "TAG")

    def set_tags(self, tags: dict[str, Any]) -> None:
        _api.log("tags", tags, "TAGS")

    def log_text(self, text: str, artifact_file_path: str) -> None:
        """Artifacts stay on the site: fl sends metrics, params and tags, not files."""
        raise NotImplementedError(
            f"MLflowWriter.log_text({artifact_file_path!r}): fl sends metrics, params and tags to the server, "
            "not artifacts; log the value as a param or tag"
        )


class WandBWriter:
    """W&B's ``run.log(metrics, step)``, sent to the server's WandBReceiver (one run per site)."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        _api.log("metrics", metrics, "METRICS", step)
