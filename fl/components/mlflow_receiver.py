"""MLflow receiver: the metrics, params and tags each site sent reach an MLflow tracking server.

One experiment per job (``kw_args["experiment_name"]``), one run per site, plus a ``server`` run
with the global model's aggregated metrics. NVIDIA FLARE's arguments; needs the ``mlflow``
package on the server (``pip install 'fl[tracking]'``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fl.components.tracking import TrackingReceiver

__all__ = ["MLflowReceiver"]

DEFAULT_EXPERIMENT = "FLARE FL Experiment"
DEFAULT_RUN_NAME = "FLARE FL Run"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]+")


class MLflowReceiver(TrackingReceiver):
    """Forwards each site's SummaryWriter / MLflowWriter records to MLflow, one run per site.

    Parameters
    ----------
    tracking_uri:
        The MLflow tracking server (``http://host:port``); default a sqlite store ``mlflow.db`` in
        the job's folder on the server.
    kw_args:
        ``experiment_name``, ``run_name`` (each site's run is ``<site>-<run_name>``),
        ``experiment_tags``, ``run_tags`` (dicts).
    artifact_location:
        The experiment's artifact location when the experiment is created.
    events:
        Accepted for FLARE compatibility (the analytics event).
    buffer_flush_time:
        Accepted for FLARE compatibility: records are delivered as each report arrives.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        kw_args: dict[str, Any] | None = None,
        artifact_location: str | None = None,
        events: list[str] | None = None,
        buffer_flush_time: float = 1,
    ) -> None:
        super().__init__(events)
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            raise ValueError(f"MLflowReceiver: tracking_uri must be a string or None, got {tracking_uri!r}")
        kw_args = dict(kw_args or {})
        for key in ("experiment_tags", "run_tags"):
            if not isinstance(kw_args.get(key, {}), dict):
                raise ValueError(f"MLflowReceiver: kw_args[{key!r}] must be a dict, got {kw_args[key]!r}")
        if not str(kw_args.get("experiment_name", DEFAULT_EXPERIMENT)).strip():
            raise ValueError("MLflowReceiver: kw_args['experiment_name'] must not be empty")
        self.tracking_uri = tracking_uri
        self.kw_args = kw_args
        self.artifact_location = artifact_location
        self.buffer_flush_time = buffer_flush_time
        self._client: Any = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}

    def _uri(self, ctx: Any) -> str:
        return self.tracking_uri or f"sqlite:///{(Path(ctx.run_dir) / 'mlflow.db').resolve()}"

    def start(self, ctx: Any) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self._uri(ctx))
        name = str(self.kw_args.get("experiment_name", DEFAULT_EXPERIMENT))
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            self._experiment_id = experiment.experiment_id
        else:
            tags = {str(k): str(v) for k, v in self.kw_args.get("experiment_tags", {}).items()}
            self._experiment_id = self._client.create_experiment(
                name, artifact_location=self.artifact_location, tags=tags
            )
        ctx.log.info("MLflow: experiment %r at %s", name, self._uri(ctx))

    def _run_id(self, ctx: Any, site: str) -> str:
        run_id = self._runs.get(site)
        if run_id is None:
            run_name = f"{site}-{self.kw_args.get('run_name', DEFAULT_RUN_NAME)}"
            tags = {str(k): str(v) for k, v in self.kw_args.get("run_tags", {}).items()}
            tags.update({"site": site, "job_id": str(ctx.job_id), "job_name": str(getattr(ctx, "job_name", ""))})
            run = self._client.create_run(self._experiment_id, run_name=run_name, tags=tags)
            run_id = self._runs[site] = run.info.run_id
        return run_id

    def deliver(self, ctx: Any, site: str, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics, params, tags = [], {}, {}
        for rec in records:
            key = _KEY_UNSAFE.sub("_", str(rec.get("tag", "")))[:250] or "_"
            kind = rec.get("kind") or ""
            if kind == "param":
                params[key] = str(rec.get("text", ""))  # cut by the server (MAX_RECORD_TEXT)
            elif kind == "tag":
                tags[key] = str(rec.get("text", ""))
            elif not kind and rec.get("value") is not None:
                if rec.get("group_member"):
                    key = _KEY_UNSAFE.sub("_", f"{key}/{rec['group_member']}")[:250]
                millis = int(float(rec.get("wall_time") or time.time()) * 1000)
                metrics.append(Metric(key, float(rec["value"]), millis, int(rec.get("step") or 0)))
        if metrics or params or tags:
            self._client.log_batch(
                self._run_id(ctx, site),
                metrics=metrics,
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )

    def finish(self, ctx: Any, status: str) -> None:
        state = {"finished": "FINISHED", "aborted": "KILLED"}.get(status, "FAILED")
        for run_id in self._runs.values():
            self._client.set_terminated(run_id, status=state)
