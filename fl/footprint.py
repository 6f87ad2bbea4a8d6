"""fl's footprint in memory-backed files: the bytes a run's models occupy in tmpfs (/dev/shm).

A file in tmpfs is memory that no process's RSS shows until someone maps it, so a measurement of
fl's memory adds :func:`tmpfs_bytes` to the processes' own figures. Counted: the files in the
simulator's folders (``fl-sim-*``, see :func:`fl.simulator._memory_folder`), and files in
/dev/shm that were removed but are still open or mapped by one of the given processes (their
memory is freed only when the last holder lets go). Pages of a mapped file also show in the PSS of
the processes mapping it; fl's scripts read models into their own memory instead (a file's pages
are then counted once, here, for as long as the file exists).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SIM_FOLDER_PREFIX", "tmpfs_bytes"]

SHM = Path("/dev/shm")
#: Name prefix of the simulator's folders in /dev/shm.
SIM_FOLDER_PREFIX = "fl-sim-"
#: In each folder, the file holding the pid of the process that made it (see fl.simulator).
OWNER_FILE = ".owner"
_DELETED = " (deleted)"


def tmpfs_bytes(pids: Iterable[int] | None = None, *, shm: Path = SHM) -> int:
    """Bytes of memory fl's files in ``shm`` hold now: of the runs whose folder a process of ``pids`` made.

    ``pids`` None: every simulator folder of this user. Files removed but still held open or mapped
    by a process of ``pids`` count too (each file once). Sizes are allocated bytes (``st_blocks``).
    """
    wanted = None if pids is None else {int(p) for p in pids}
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in _sim_folders(shm, wanted):
        for path in _files_under(folder):
            total += _count_once(path, seen)
    for pid in wanted or ():
        total += _held_deleted_bytes(pid, shm, seen)
    return total


def _sim_folders(shm: Path, pids: set[int] | None) -> list[Path]:
    """This user's simulator folders in ``shm`` (those made by one of ``pids``, if given)."""
    folders = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(shm):
            if not entry.name.startswith(SIM_FOLDER_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                if pids is None or _owner_pid(Path(entry.path)) in pids:
                    folders.append(Path(entry.path))
    return folders


def _owner_pid(folder: Path) -> int | None:
    try:
        return int((folder / OWNER_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _files_under(folder: Path) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(folder):
        found += [os.path.join(root, name) for name in files]
    return found


def _count_once(path: str, seen: set[tuple[int, int]]) -> int:
    """Allocated bytes of the file at ``path`` (a /proc fd link works too), or 0 if counted before or gone."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    return int(st.st_blocks) * 512


def _held_deleted_bytes(pid: int, shm: Path, seen: set[tuple[int, int]]) -> int:
    """Bytes of removed files in ``shm`` that process ``pid`` still has open or mapped."""
    prefix = f"{shm}/"
    total = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix) and target.endswith(_DELETED):
                    total += _count_once(f"/proc/{pid}/fd/{fd}", seen)
    total += _mapped_deleted_bytes(pid, prefix, seen)
    return total


def _mapped_deleted_bytes(pid: int, prefix: str, seen: set[tuple[int, int]]) -> int:
    """Bytes of removed files under ``prefix`` mapped by ``pid`` (the extent mapped, per file)."""
    extents: dict[tuple[str, int], int] = {}
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith(prefix) or not fields[5].rstrip("\n").endswith(_DELETED):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        key = (fields[3], int(fields[4]))
        extents[key] = max(extents.get(key, 0), int(fields[2], 16) + end - start)
    total = 0
    for (device, inode), extent in extents.items():
        major, minor = (int(x, 16) for x in device.split(":"))
        file_key = (os.makedev(major, minor), inode)
        if file_key not in seen:
            seen.add(file_key)
            total += extent
    return total
