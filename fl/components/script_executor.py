"""Site-side: run the job's training script in its own process (see :mod:`fl.site.job_runner`).

One class for FLARE's script executors (ScriptExecutor, the launcher executor and the in-process
executors, see :mod:`fl.aliases`): fl always runs the script in a process of its own, so that a crash
or an out-of-memory in training never takes the site down, whatever the config asks.
"""

from __future__ import annotations

from pathlib import Path

from fl.components.base import Component

__all__ = [
    "EXCHANGE_FORMATS",
    "LAUNCH_ONCE_ENV",
    "ScriptExecutor",
    "choose_launch_once",
    "job_launch_once",
    "launch_mode_line",
]

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
    launch_once:
        FLARE's setting: True starts the script once for the whole job; False starts it for each task
        (the script ends after sending that task's result: ``flare.is_running()`` turns False, and what
        must survive between rounds goes in ``flare.get_state()``); None (the default) lets the site
        decide (the simulator runs per task when it has more sites than ``threads``; ``fl site`` once).
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
        launch_once: bool | None = None,
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
        if launch_once is not None and not isinstance(launch_once, bool):
            raise ValueError(f"launch_once must be true, false or null, got {launch_once!r}")
        self.task_script_path = task_script_path
        self.task_script_args = task_script_args
        # The client API knows torch and NumPy; "raw" arrays are NumPy arrays in fl.
        self.params_exchange_format = "numpy" if params_exchange_format == "raw" else params_exchange_format
        self.command = command
        self.params_transfer_type = params_transfer_type
        self.server_expected_format = server_expected_format
        self.launch_once = launch_once


#: The StartJob env entry by which a host (the simulator) gives its sites the mode for jobs that leave
#: ``launch_once`` unset: "1" launch once, "0" per task; absent: launch once (``fl site``, FLARE's default).
LAUNCH_ONCE_ENV = "FL_LAUNCH_ONCE"


def choose_launch_once(job_setting: bool | None, sites: int, threads: int | None) -> tuple[bool, str]:
    """The simulator's mode for a run, and why: the job's ``launch_once`` wins; otherwise per task when
    fewer sites train at once (``threads``) than there are sites, else once (every site trains at once)."""
    if job_setting is not None:
        return job_setting, f"the job sets launch_once={job_setting}"
    if threads and threads < sites:
        return False, f"{sites} sites and threads={threads}: at most {threads} scripts exist at once"
    return True, f"every site of {sites} trains at once (threads={threads or sites})"


def launch_mode_line(launch_once: bool, reason: str, *, reused: bool = False) -> str:
    """The one line a simulation logs about its mode (``reused``: per-task runs share worker processes)."""
    if launch_once:
        return f"scripts run once for the whole job (launch_once): {reason}"
    how = (
        "each run on a reused worker process, the job's modules imported afresh (--fresh-processes: a fork each)"
        if reused
        else "each run a fork of its own"
    )
    return (
        f"scripts run per task (launch_once=False): {reason}; {how}; a script's in-memory state does not "
        "survive between rounds in this mode: keep what must in flare.get_state()"
    )


def job_launch_once(job_dir: Path) -> bool | None:
    """The ``launch_once`` an exported job's site apps set (the first app that sets it), else None."""
    from fl.config import ConfigError, load_config

    for path in sorted(job_dir.glob("*/config/config_fed_client.json")):
        try:
            executors = load_config(path).get("executors") or []
        except ConfigError:
            continue  # the job's own checks report it
        for entry in executors:
            spec = entry.get("executor") if isinstance(entry, dict) else None
            args = spec.get("args") if isinstance(spec, dict) else None
            value = args.get("launch_once") if isinstance(args, dict) else None
            if isinstance(value, bool):
                return value
    return None
