"""The simulator's /dev/shm folders: a folder whose process was killed is removed by the next start,
a folder whose process is alive is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fl import simulator
from fl.fsutil import OWNER_FILE, sweep_owned_folders

OLD = time.time() - 3600


def _age(path: Path) -> None:
    os.utime(path, (OLD, OLD))


def test_a_killed_owners_folder_is_swept_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from fl import simulator;"
        "folder, fd = simulator._memory_folder(Path(sys.argv[1]));"
        "(folder / 'site-1').mkdir(); (folder / 'site-1' / 'model.safetensors').write_bytes(b'x' * 4096);"
        "print(folder, flush=True); sys.stdin.readline()"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        folder = Path(owner.stdout.readline().strip())
        assert folder.parent == tmp_path and folder.name.startswith("fl-sim-")
        _age(folder / OWNER_FILE)

        assert simulator._sweep_stale(tmp_path) == []  # alive: its lock is held
        assert (folder / "site-1" / "model.safetensors").exists()

        owner.send_signal(signal.SIGKILL)  # no chance to clean up
        owner.wait(10)
        assert folder.exists()
        assert simulator._sweep_stale(tmp_path) == [folder]
        assert not folder.exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


def test_the_next_folder_sweeps_the_dead_ones_and_its_own_lives_until_closed(tmp_path: Path) -> None:
    dead = tmp_path / "fl-sim-dead"
    dead.mkdir()
    (dead / OWNER_FILE).write_text("12345\n")  # nobody holds its lock
    _age(dead / OWNER_FILE)
    memory = simulator._memory_folder(tmp_path)
    assert memory is not None
    folder, fd = memory
    try:
        assert not dead.exists()
        _age(folder / OWNER_FILE)
        assert simulator._sweep_stale(tmp_path) == []  # this process holds it
        assert folder.exists()
    finally:
        os.close(fd)
    assert simulator._sweep_stale(tmp_path) == [folder]


def test_a_folder_that_is_just_starting_or_not_ours_is_left_alone(tmp_path: Path) -> None:
    starting = tmp_path / "fl-sim-starting"  # made by mkdtemp, its owner not locked yet
    starting.mkdir()
    unlocked_new = tmp_path / "fl-sim-new"  # lock file just created, not yet locked
    unlocked_new.mkdir()
    (unlocked_new / OWNER_FILE).write_text("")
    old_without_owner = tmp_path / "fl-sim-old"  # left by a version without the lock
    old_without_owner.mkdir()
    _age(old_without_owner)
    other = tmp_path / "something-else"
    other.mkdir()
    _age(other)
    link = tmp_path / "fl-sim-link"
    link.symlink_to(other)

    assert simulator._sweep_stale(tmp_path) == [old_without_owner]
    assert starting.exists() and unlocked_new.exists() and other.exists() and link.is_symlink()


def test_a_fork_workers_folder_of_a_killed_sites_host_is_swept_by_the_next_start(tmp_path: Path) -> None:
    """The warm fork worker's socket folder is owned the same way (a sites host may die of SIGKILL)."""
    code = (
        "from fl.site import fork_server; server = fork_server.start(preload=());"
        "print(server.socket_path.parent, flush=True); import sys; sys.stdin.readline()"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    host = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert host.stdout is not None
        folder = Path(host.stdout.readline().strip())
        assert folder.parent == tmp_path and folder.name.startswith("fl-fork-") and (folder / "socket").exists()
        _age(folder / OWNER_FILE)
        assert sweep_owned_folders(tmp_path, "fl-fork-") == []  # its host lives
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        assert sweep_owned_folders(tmp_path, "fl-fork-") == [folder]
        assert not folder.exists()
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)
