"""The Job API: ``FedJob``, ``ScriptRunner`` and friends (see :mod:`fl.job.fed_job`)."""

from fl.job.fed_avg import FedAvgJob
from fl.job.fed_job import ExchangeFormat, FedJob, FrameworkType, JobConfigError, PTModel, ScriptRunner, TransferType

__all__ = [
    "ExchangeFormat",
    "FedAvgJob",
    "FedJob",
    "FrameworkType",
    "JobConfigError",
    "PTModel",
    "ScriptRunner",
    "TransferType",
]
