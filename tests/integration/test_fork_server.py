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


# ---------------------------------------------------------------------- reused workers (fl.site.warm_worker)
def _run(
    server: fork_server.ForkServer, script: Path, *args: str, key: str = "job-1", env: dict[str, str] | None = None
):
    started = start_forked(server.socket_path, [str(script), *args], cwd=script.parent, env=env or {}, key=key)
    assert started.process.stdout is not None
    code = started.process.wait(30)
    out = started.process.stdout.read().decode()  # EOF: the worker let go of the run's output
    assert started.parent is not None
    started.parent.settimeout(5)
    assert started.parent.recv(10) == b"", "the run's channel is still open in the worker"
    started.parent.close()
    return started.process.pid, code, out


def test_runs_of_one_key_share_a_worker_and_each_sees_what_a_fresh_process_would(server, tmp_path):
    (tmp_path / "jobmodule.py").write_text("COUNT = []\n")
    script = _script(
        tmp_path,
        "import logging, os, random, sys, jobmodule\n"
        "jobmodule.COUNT.append(1)\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "logging.info('log line')\n"
        "print(sys.argv[1], os.environ.get('WHO'), os.environ.get('LEFT'), len(jobmodule.COUNT), random.random())\n"
        "os.environ['LEFT'] = 'over'\n"
        "os.chdir('/')\n",
    )
    first = _run(server, script, "a", env={"WHO": "site-1"})
    second = _run(server, script, "b", env={"WHO": "site-2"})
    assert first[0] == second[0], "the second run did not reuse the first run's worker"
    assert first[1] == second[1] == 0
    a, b = first[2].splitlines(), second[2].splitlines()
    assert a[0] == b[0] == "log line"  # one handler each run: basicConfig's of the last run is gone
    words_a, words_b = a[1].split(), b[1].split()
    assert words_a[:4] == ["a", "site-1", "None", "1"]
    assert words_b[:4] == ["b", "site-2", "None", "1"], "state of the last run leaked into this one"
    assert words_a[4] == words_b[4], "the random generator was not put back"
    other = _run(server, script, "c", key="job-2")
    assert other[0] != first[0], "another job's run took this job's worker"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n", 0),
        ("import subprocess\nsubprocess.Popen(['sleep', '30'])\n", 0),
        ("import os\nkept = os.dup(1)\n", 0),
        ("raise SystemExit(4)\n", 4),
        # a socket on the channel's descriptor kept alive by a cycle: the collection after the run closes it
        ("import os, socket\nclass Holder: pass\nh = Holder()\nh.me, h.sock = h, socket.socket(fileno=3)\n", 0),
    ],
    ids=["thread", "child-process", "output-descriptor", "failed-run", "stale-channel-object"],
)
def test_a_run_that_leaves_something_behind_retires_its_worker(server, tmp_path, body, code):
    leaky = _script(tmp_path, body)
    pid, got, _ = _run(server, leaky, key=f"job-{tmp_path.name}")
    assert got == code
    assert _ends_within(pid, 10.0), "the worker was kept after a run it could not clean up after"
    clean = tmp_path / "clean.py"
    clean.write_text("print('ok')\n")
    again = _run(server, clean, key=f"job-{tmp_path.name}")
    assert again[0] != pid and again[1:] == (0, "ok\n")


def test_a_worker_signalled_or_given_up_mid_run_ends_and_the_next_run_gets_a_fresh_one(server, tmp_path):
    script = _script(tmp_path, "import sys, time\nprint('up', flush=True)\ntime.sleep(300)\n")
    started = start_forked(server.socket_path, [str(script)], cwd=tmp_path, env={}, key="job-sig")
    assert started.process.stdout is not None and started.process.stdout.readline() == b"up\n"
    signal_group(started.process, signal.SIGTERM)
    assert started.process.wait(30) == -signal.SIGTERM
    given_up = start_forked(server.socket_path, [str(script)], cwd=tmp_path, env={}, key="job-sig")
    assert given_up.process.stdout is not None and given_up.process.stdout.readline() == b"up\n"
    assert given_up.process.pid != started.process.pid
    given_up.process._conn.close()  # type: ignore[union-attr]
    assert _ends_within(given_up.process.pid, 10.0)


# ---------------------------------------------------------------------- one server shared by a run's processes
def test_a_process_that_shares_anothers_server_forks_from_it_and_gives_up_once_it_is_gone(server, tmp_path):
    """The simulator starts the run's fork server and its sites hosts attach to it (fl.site.fork_server.attach)."""
    shared = fork_server.SharedForkServer(server.socket_path)
    assert shared.wait_ready(10)
    script = _script(tmp_path, "print('forked', flush=True)\n")
    started = start_forked(shared.socket_path, [str(script)], cwd=tmp_path, env={})
    assert started.process.stdout is not None and started.process.stdout.read() == b"forked\n"
    assert started.process.wait(30) == 0

    before = fork_server._active
    try:
        # A server that dies before it is ready takes its folder with it: whoever shares it gives up at once.
        dying = fork_server.start(preload=("torch",), wait=False)
        dying.process.kill()
        began = time.monotonic()
        assert not fork_server.SharedForkServer(dying.socket_path).wait_ready(60)
        assert time.monotonic() - began < 10, "waited for a server that was gone"
        dying.stop()
        attached = fork_server.attach(server.socket_path)
        assert fork_server.active_socket() == server.socket_path
        attached.stop()  # stops using it; its owner keeps it
        assert fork_server.active_socket() is None and server.alive()
    finally:
        fork_server._active = before
