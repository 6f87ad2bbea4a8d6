"""fl: a federated learning runtime for PyTorch."""

from __future__ import annotations

from typing import Any

from fl import aliases as _aliases

__version__ = "0.1.0"

# FLARE's module layout under fl. (fl.app_common..., fl.job_config...), from fl.aliases' one table.
_aliases.install()

__all__ = ["FedJob", "FilterType", "ScriptRunner", "__version__"]


def __getattr__(name: str) -> Any:
    # `from fl import FedJob` (FLARE's `from nvflare import FedJob, FilterType`) without importing
    # the job machinery for every `import fl`.
    if name in ("FedJob", "FilterType", "ScriptRunner"):
        from fl import job

        return getattr(job, name)
    raise AttributeError(f"module 'fl' has no attribute {name!r}")
