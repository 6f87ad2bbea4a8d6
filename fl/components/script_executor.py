"""Site-side: run the job's training script in its own process (see :mod:`fl.site.job_runner`)."""

from __future__ import annotations

from fl.components.base import Component

__all__ = ["ScriptExecutor"]


class ScriptExecutor(Component):
    """Settings of the script a site runs for a job's tasks.

    Parameters
    ----------
    task_script_path:
        The script, relative to the app's ``custom`` folder.
    task_script_args:
        Its command-line arguments (a shell-quoted string).
    params_exchange_format:
        ``"pytorch"`` (the script receives torch tensors) or ``"numpy"``.
    command:
        The interpreter command, default the site's own Python with unbuffered output.
    """

    def __init__(
        self,
        task_script_path: str,
        task_script_args: str = "",
        params_exchange_format: str = "pytorch",
        command: str | None = None,
    ) -> None:
        if not task_script_path:
            raise ValueError("ScriptExecutor needs task_script_path")
        if params_exchange_format not in ("pytorch", "numpy"):
            raise ValueError(f"params_exchange_format must be 'pytorch' or 'numpy', got {params_exchange_format!r}")
        self.task_script_path = task_script_path
        self.task_script_args = task_script_args
        self.params_exchange_format = params_exchange_format
        self.command = command
