"""Start a job's training script with its channel: a socketpair it inherits, or (ranks of
``torch.distributed.run``, which inherit no fd) a unix socket its rank 0 connects to; or fork it
from this process's fork server (:mod:`fl.site.fork_server`, per-task runs), socketpair and all.

One mechanism for the site's job runner and the Kubernetes launcher's shim in the job pod;
:func:`signal_group` and :func:`wait_unreaped` treat both kinds of process alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fl.channel import ChannelListener
from fl.process import popen_bound_to_parent
from fl.site.fork_server import ForkedScript, spawn

__all__ = ["ScriptProcess", "signal_group", "start_forked", "start_script", "stop_group", "wait_unreaped"]

#: Seconds a script gets after SIGTERM before its group gets SIGKILL (:func:`stop_group`).
STOP_GRACE_S = 10.0


@dataclass
class ScriptProcess:
    """The script's process, its output on ``process.stdout``; ``parent``: the socketpair's end for the
    site (None for ranks); ``listener``: where rank 0 connects (None for a plain script)."""

    process: subprocess.Popen[bytes] | ForkedScript
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


def start_forked(
    socket_path: Path, argv: Sequence[str], *, cwd: str | Path, env: Mapping[str, str], key: str | None = None
) -> ScriptProcess:
    """Run ``argv`` (a script and its arguments) from the fork server at ``socket_path``, with a socketpair
    channel; ``key``: runs of the same key may share a reused worker (:func:`fl.site.fork_server.spawn`)."""
    parent, child = socket.socketpair()
    try:
        process = spawn(socket_path, argv, cwd=cwd, env=env, channel_fd=child.fileno(), key=key)
    except OSError:
        parent.close()
        raise
    finally:
        child.close()
    return ScriptProcess(process, parent, None)


def signal_group(process: subprocess.Popen[bytes] | ForkedScript, sig: int) -> None:
    """Send ``sig`` to the script's process group (the script and what it started), if it still runs."""
    if isinstance(process, ForkedScript):
        process.signal_group(sig)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def wait_unreaped(process: subprocess.Popen[bytes] | ForkedScript) -> None:
    """Wait until the script exits, then end what is left of its process group; the script itself is
    not reaped here, so that its pid (the group's id) cannot be reused meanwhile. (A forked script's
    server does the same before it reports the exit.)"""
    if isinstance(process, ForkedScript):
        process.wait()
        return
    with contextlib.suppress(ChildProcessError):  # reaped already (by a kill that waited for it)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def stop_group(process: subprocess.Popen[bytes] | ForkedScript, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to the script's group, ``grace`` seconds for it to exit, then SIGKILL to what is left of it."""
    signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    signal_group(process, signal.SIGKILL)
