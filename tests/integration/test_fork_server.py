"""The fork server and the runner's handle on a forked script (fl.site.fork_server), with real processes:
the handle reads as a Popen would (exit code, a signal's death, output), signals reach the script's group
through the server, and a runner that gives a run up (its connection closes) ends that script only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fl.site import fork_server
from fl.site.script_process import signal_group, start_forked, wait_unreaped

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[fork_server.ForkServer]:
    started = fork_server.start(preload=())  # nothing to import: the protocol is the same
    yield started
    started.stop()


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(body)
    return path


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``seconds`` (a signal's delivery takes a moment)."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_a_forked_script_gets_its_argv_env_cwd_and_channel_and_its_exit_code_reads_as_popens(server, tmp_path):
    script = _script(
        tmp_path,
        "import os, socket, sys\n"
        "channel = socket.socket(fileno=int(os.environ['FL_CHANNEL_FD']))\n"
        "channel.sendall(b'hello from ' + sys.argv[1].encode())\n"
        "print('cwd', os.getcwd(), 'env', os.environ['WHO'], flush=True)\n"
        "sys.exit(3)\n",
    )
    started = start_forked(server.socket_path, [str(script), "site-1"], cwd=tmp_path, env={"WHO": "me"})
    assert started.parent is not None and started.process.stdout is not None
    assert started.parent.recv(100) == b"hello from site-1"
    assert started.process.wait(30) == 3 and started.process.poll() == 3
    assert started.process.stdout.read().decode() == f"cwd {tmp_path} env me\n"


def test_signals_reach_the_scripts_group_and_a_death_by_signal_reads_negative(server, tmp_path):
    script = _script(tmp_path, "import subprocess, time\nsubprocess.Popen(['sleep', '300'])\ntime.sleep(300)\n")
    started = start_forked(server.socket_path, [str(script)], cwd=tmp_path, env={})
    deadline = time.monotonic() + 30
    while not psutil.Process(started.process.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(started.process.pid).children()[0].pid
    assert started.process.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        started.process.wait(0.2)
    signal_group(started.process, signal.SIGTERM)
    assert started.process.wait(30) == -signal.SIGTERM
    wait_unreaped(started.process)
    assert _ends_within(child, 5.0), "what the script started outlived it"
    signal_group(started.process, signal.SIGKILL)  # after the exit: nothing is signalled, nothing raises


def test_a_closed_connection_ends_its_script_and_spares_the_others(server, tmp_path):
    script = _script(tmp_path, "import time\ntime.sleep(300)\n")
    runs = [start_forked(server.socket_path, [str(script)], cwd=tmp_path, env={}) for _ in range(2)]
    given_up, kept = runs
    conn = given_up.process._conn  # type: ignore[union-attr]
    assert isinstance(conn, socket.socket)
    conn.close()  # what a runner's death (even SIGKILL) does
    assert _ends_within(given_up.process.pid, 10.0)
    time.sleep(0.5)
    assert _alive(kept.process.pid), "another run's script was ended too"
    signal_group(kept.process, signal.SIGKILL)
    assert kept.process.wait(30) == -signal.SIGKILL


def test_a_request_the_server_cannot_serve_is_an_oserror_naming_it(server, tmp_path):
    with pytest.raises(OSError, match="cannot reach the fork server"):
        start_forked(tmp_path / "no-such-socket", ["x.py"], cwd=tmp_path, env={})
    assert len(os.listdir("/proc/self/fd")) < 200  # nothing leaked per attempt (pipes, sockets)
