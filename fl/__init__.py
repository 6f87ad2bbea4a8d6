"""fl: a federated learning runtime for PyTorch."""

from __future__ import annotations

from typing import Any

from fl import aliases as _aliases

__version__ = "0.1.0"

# FLARE's module layout under fl. (fl.app_common..., fl.job_config...), from fl.aliases' one table.
_aliases.install()

__all__ = ["FedJob", "ScriptRunner", "__version__"]


def __getattr__(name: str) -> Any:
    # `from fl import FedJob` without importing the job machinery for every `import fl`.
    if name in ("FedJob", "ScriptRunner"):
        from fl import job

        return getattr(job, name)
    raise AttributeError(f"module 'fl' has no attribute {name!r}")
