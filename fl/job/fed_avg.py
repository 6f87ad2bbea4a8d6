"""FLARE 2.5's ``FedAvgJob``: a FedJob with FedAvg and the initial model already on the server."""

from __future__ import annotations

from typing import Any

from fl.job.fed_job import FedJob, JobConfigError

__all__ = ["FedAvgJob"]


class FedAvgJob(FedJob):
    """``FedAvgJob(name, n_clients, num_rounds, initial_model)``: add ScriptRunners to the sites and run.

    The validation JSON, model selector and TensorBoard receiver come with every FedJob.
    """

    def __init__(
        self,
        initial_model: Any,
        n_clients: int,
        num_rounds: int,
        name: str = "fed_job",
        min_clients: int = 1,
        mandatory_clients: list[str] | None = None,
        key_metric: str | None = "accuracy",
    ) -> None:
        if n_clients < 1:
            raise JobConfigError(f"FedAvgJob: n_clients must be at least 1, got {n_clients}")
        super().__init__(
            name=name,
            min_clients=min_clients,
            mandatory_clients=mandatory_clients,
            key_metric=key_metric,
        )
        from fl.workflows.fedavg import FedAvg

        self.to(FedAvg(num_clients=n_clients, num_rounds=num_rounds), "server")
        self.to(initial_model, "server")
