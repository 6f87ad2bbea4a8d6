"""How a site starts a job's training script: the site's Python, or ``torch.distributed.run`` with N ranks.

One resolver for the executor's ``command`` and the site's ``--nproc-per-node``:

- no command (or FLARE's ``python3 -u``): the site's own Python runs the script;
- a command starting ``python``/``python3`` runs with the site's Python (the interpreter fl itself runs on);
- ``python3 -m torch.distributed.run ...`` or ``torchrun ...`` (FLARE's multi-GPU spelling), or a site with
  ``nproc_per_node > 1`` and no launcher in the command: ``torch.distributed.run --nnodes=1
  --nproc_per_node=N --master_port=<free port>``, the ranks bound to torchrun by the kernel (they end
  with it, however it ends) and the script's channel a unix socket (torchrun's children inherit no fds).
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from fl.process import bound_to_launcher, launcher_command
from fl.pythonpath import script_command

__all__ = ["DISTRIBUTED_MODULE", "Launch", "LaunchError", "free_port", "training_command"]

DISTRIBUTED_MODULE = "torch.distributed.run"
#: Interpreter names in a job's command that mean "Python": the site's own interpreter runs them.
PYTHON_NAMES = frozenset({"python", "python3"})
#: torchrun options under which fl could not run the job's script file as a rank (fl names the script itself).
UNSUPPORTED_LAUNCHER_OPTIONS = frozenset({"--no-python", "--run-path", "--module", "-m"})
#: Options that say where the ranks meet; without one, fl adds ``--master_port=<free port>``.
RENDEZVOUS_OPTIONS = frozenset({"--master-port", "--rdzv-endpoint", "--standalone"})
#: The launcher's pid, in its own environment: what its ranks are bound to (fl.process.bound_to_launcher).
LAUNCHER_PID_VARIABLE = "FL_LAUNCHER_PID"


class LaunchError(ValueError):
    """The job's command and the site's settings do not make a runnable training command."""


@dataclass(frozen=True)
class Launch:
    """The argv of a job's training script and whether it runs as ranks of ``torch.distributed.run``."""

    argv: list[str]
    distributed: bool


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (torchrun's rendezvous; two jobs on one machine must not share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def training_command(command: str | None, script: Path, script_args: str = "", nproc_per_node: int = 1) -> Launch:
    """The argv that runs ``script`` with ``script_args`` for a job whose executor says ``command``.

    ``nproc_per_node`` is the site's setting (``fl site --nproc-per-node``, the chart's ``nprocPerNode``):
    it applies when the job's command names no launcher of its own; a job's torchrun command wins.
    """
    if nproc_per_node < 1:
        raise LaunchError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    tokens = _site_interpreter(shlex.split(command or ""))
    args = shlex.split(script_args or "")
    split = _launcher_split(tokens)
    if split is None and nproc_per_node > 1:
        if tokens and tokens[0] != sys.executable:
            raise LaunchError(
                f"this site runs {nproc_per_node} ranks per job (nproc_per_node) but the job's command "
                f"{command!r} is not Python nor torch.distributed.run; give the job a torchrun command"
            )
        tokens = [sys.executable, "-m", DISTRIBUTED_MODULE, "--nnodes=1", f"--nproc_per_node={nproc_per_node}"]
        split = 3
    if split is None:
        return Launch([*tokens, str(script), *args] if tokens else script_command(script, *args), False)
    launcher, options = tokens[:split], _launcher_options(tokens[split:], command)
    rank = bound_to_launcher([sys.executable, "-u", str(script), *args], LAUNCHER_PID_VARIABLE)
    return Launch(launcher_command([*launcher, *options, "--no-python", *rank], LAUNCHER_PID_VARIABLE), True)


def _site_interpreter(tokens: list[str]) -> list[str]:
    """``python``/``python3`` as the site's interpreter; ``torchrun`` as its ``python -m torch.distributed.run``."""
    if not tokens:
        return tokens
    if tokens[0] in PYTHON_NAMES:
        return [sys.executable, *tokens[1:]]
    if os.path.basename(tokens[0]) == "torchrun":
        return [sys.executable, "-m", DISTRIBUTED_MODULE, *tokens[1:]]
    return tokens


def _launcher_split(tokens: list[str]) -> int | None:
    """The index just after ``-m torch.distributed.run`` in a Python command; None if it names no launcher."""
    if not tokens or tokens[0] != sys.executable:
        return None
    for i, token in enumerate(tokens[1:-1], start=1):
        if token == "-m" and tokens[i + 1] == DISTRIBUTED_MODULE:
            return i + 2
    return None


def _launcher_options(options: list[str], command: str | None) -> list[str]:
    """torchrun's options from the job, checked, with a free ``--master_port`` when they name no rendezvous."""
    names = {option.split("=", 1)[0].replace("_", "-") for option in options if option.startswith("-")}
    refused = sorted(names & UNSUPPORTED_LAUNCHER_OPTIONS)
    if refused:
        raise LaunchError(
            f"the job's command {command!r} has {', '.join(refused)}: fl runs the job's task_script_path "
            "as each rank's script; remove them"
        )
    if names & RENDEZVOUS_OPTIONS:
        return list(options)
    return [*options, f"--master_port={free_port()}"]
