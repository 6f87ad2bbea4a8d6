"""Start a job's training script with its channel: a socketpair it inherits, or (ranks of
``torch.distributed.run``, which inherit no fd) a unix socket its rank 0 connects to.

One mechanism for the site's job runner and the Kubernetes launcher's shim in the job pod.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fl.channel import ChannelListener
from fl.process import popen_bound_to_parent

__all__ = ["ScriptProcess", "start_script"]


@dataclass
class ScriptProcess:
    """The script's process, its output on ``process.stdout``; ``parent``: the socketpair's end for the
    site (None for ranks); ``listener``: where rank 0 connects (None for a plain script)."""

    process: subprocess.Popen[bytes]
    parent: socket.socket | None
    listener: ChannelListener | None


def start_script(
    command: Sequence[str],
    *,
    distributed: bool,
    channel_dir: Path,
    cwd: str | Path,
    env: Mapping[str, str],
    death_signal: int = signal.SIGKILL,
) -> ScriptProcess:
    """Start ``command`` in a session of its own (stdin closed, stdout and stderr one pipe), bound to this
    process (``death_signal`` when it dies), with ``FL_CHANNEL_FD`` or ``FL_CHANNEL_PATH``/``FL_CHANNEL_TOKEN``."""
    env = dict(env)
    parent: socket.socket | None = None
    child: socket.socket | None = None
    listener: ChannelListener | None = None
    if distributed:
        listener = ChannelListener(channel_dir)
        env.update({"FL_CHANNEL_PATH": str(listener.path), "FL_CHANNEL_TOKEN": listener.token})
    else:
        parent, child = socket.socketpair()
        env["FL_CHANNEL_FD"] = str(child.fileno())
    try:
        process = popen_bound_to_parent(
            command,
            death_signal=death_signal,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(child.fileno(),) if child is not None else (),
            start_new_session=True,
        )
    except OSError:
        if listener is not None:
            listener.close()
        if parent is not None:
            parent.close()
        raise
    finally:
        if child is not None:
            child.close()
    return ScriptProcess(process, parent, listener)
