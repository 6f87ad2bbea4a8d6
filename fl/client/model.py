"""FLModel: what a training script receives from and sends to the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["FLMetaKey", "FLModel", "ParamsType"]


class ParamsType(str, Enum):
    """Whether ``params`` are the full weights or a difference to the weights received."""

    FULL = "FULL"
    DIFF = "DIFF"


class FLMetaKey:
    """Keys of ``FLModel.meta`` that the runtime reads or fills in."""

    #: Local steps behind a result; FedAvg weights each site's update by it (equal weights if absent).
    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"
    TASK_NAME = "task_name"


@dataclass
class FLModel:
    """Params (a torch state dict or a dict of numpy arrays), metrics and meta of one exchange.

    The positional order of the fields is NVIDIA FLARE's, so that ported scripts behave the same.
    """

    params_type: ParamsType | str | None = None
    params: Any = None
    optimizer_params: Any = None
    metrics: dict[str, Any] | None = None
    start_round: int | None = 0
    current_round: int | None = None
    total_rounds: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.meta is None:
            self.meta = {}
        if isinstance(self.params_type, str):
            try:
                self.params_type = ParamsType(self.params_type.upper())
            except ValueError:
                raise ValueError(f"params_type must be FULL or DIFF, got {self.params_type!r}") from None

    def summary(self) -> dict[str, Any]:
        """A short description for logs: counts, not values."""
        return {
            "params_type": getattr(self.params_type, "value", self.params_type),
            "params": None if self.params is None else len(self.params),
            "metrics": self.metrics,
            "current_round": self.current_round,
            "total_rounds": self.total_rounds,
            "meta": self.meta,
        }
