"""fl: a federated learning runtime for PyTorch."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["FedJob", "ScriptRunner", "__version__"]


def __getattr__(name: str) -> Any:
    # `from fl import FedJob` without importing the job machinery for every `import fl`.
    if name in ("FedJob", "ScriptRunner"):
        from fl import job

        return getattr(job, name)
    raise AttributeError(f"module 'fl' has no attribute {name!r}")
