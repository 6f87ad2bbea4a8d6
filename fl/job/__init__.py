"""The Job API: ``FedJob``, ``ScriptRunner`` and friends (see :mod:`fl.job.fed_job`)."""

from fl.job.fed_job import FedJob, JobConfigError, PTModel, ScriptRunner

__all__ = ["FedJob", "JobConfigError", "PTModel", "ScriptRunner"]
