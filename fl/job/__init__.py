"""The Job API: ``FedJob``, ``ScriptRunner`` and friends (see :mod:`fl.job.fed_job`)."""

from fl.job.fed_avg import FedAvgJob
from fl.job.fed_job import FedJob, FilterType, FrameworkType, JobConfigError, PTModel, ScriptRunner

__all__ = [
    "FedAvgJob",
    "FedJob",
    "FilterType",
    "FrameworkType",
    "JobConfigError",
    "PTModel",
    "ScriptRunner",
]
