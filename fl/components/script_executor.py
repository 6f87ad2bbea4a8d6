"""Site-side: run the job's training script in its own process (see :mod:`fl.site.job_runner`).

One class for FLARE's script executors (ScriptExecutor, the launcher executor and the in-process
executors, see :mod:`fl.aliases`): fl always runs the script in a process of its own, so that a crash
or an out-of-memory in training never takes the site down, whatever the config asks.
"""

from __future__ import annotations

from fl.components.base import Component

__all__ = ["EXCHANGE_FORMATS", "ScriptExecutor"]

#: What the script receives: torch tensors, NumPy arrays, or ("raw") the arrays as they travel (NumPy).
EXCHANGE_FORMATS = ("pytorch", "numpy", "raw")
#: FULL: the script's params go as sent; DIFF: FLARE's, a FULL result is sent as its difference to the received model.
TRANSFER_TYPES = ("FULL", "DIFF")


class ScriptExecutor(Component):
    """Settings of the script a site runs for a job's tasks.

    Parameters
    ----------
    task_script_path:
        The script, relative to the app's ``custom`` folder.
    task_script_args:
        Its command-line arguments (a shell-quoted string).
    params_exchange_format:
        ``"pytorch"`` (the script receives torch tensors), ``"numpy"`` or ``"raw"`` (NumPy arrays).
    command:
        The interpreter command, default the site's own Python with unbuffered output.
    params_transfer_type:
        ``"FULL"``, or ``"DIFF"``: the client API sends a FULL result as its difference to the model it
        received (FLARE's ``TransferType.DIFF``); a script may also send ``FLModel(params_type="DIFF")`` itself.
    server_expected_format:
        FLARE's setting of what the server converts results to; fl's server always keeps arrays
        (safetensors), so ``"numpy"`` and ``"pytorch"`` both work.
    train_task_name, evaluate_task_name, submit_model_task_name, train_with_evaluation, task_wait_time,
    result_pull_interval, log_pull_interval:
        FLARE's in-process executor settings, accepted so that its exported configs run; fl's tasks
        and relays have their own names and deadlines.
    """

    def __init__(
        self,
        task_script_path: str,
        task_script_args: str = "",
        params_exchange_format: str = "pytorch",
        command: str | None = None,
        params_transfer_type: str = "FULL",
        server_expected_format: str = "numpy",
        train_task_name: str = "train",
        evaluate_task_name: str = "validate",
        submit_model_task_name: str = "submit_model",
        train_with_evaluation: bool = True,
        task_wait_time: float | None = None,
        result_pull_interval: float = 0.5,
        log_pull_interval: float | None = None,
    ) -> None:
        params_exchange_format = getattr(params_exchange_format, "value", params_exchange_format)
        params_transfer_type = getattr(params_transfer_type, "value", params_transfer_type)
        server_expected_format = getattr(server_expected_format, "value", server_expected_format)
        if not task_script_path:
            raise ValueError("ScriptExecutor needs task_script_path")
        if params_exchange_format not in EXCHANGE_FORMATS:
            raise ValueError(
                f"params_exchange_format must be one of {', '.join(EXCHANGE_FORMATS)}, got {params_exchange_format!r}"
            )
        if params_transfer_type not in TRANSFER_TYPES:
            raise ValueError(
                f"params_transfer_type must be one of {', '.join(TRANSFER_TYPES)}, got {params_transfer_type!r}"
            )
        if server_expected_format not in ("numpy", "pytorch"):
            raise ValueError(f"server_expected_format must be 'numpy' or 'pytorch', got {server_expected_format!r}")
        self.task_script_path = task_script_path
        self.task_script_args = task_script_args
        # The client API knows torch and NumPy; "raw" arrays are NumPy arrays in fl.
        self.params_exchange_format = "numpy" if params_exchange_format == "raw" else params_exchange_format
        self.command = command
        self.params_transfer_type = params_transfer_type
        self.server_expected_format = server_expected_format
