"""Atomic file writes: a temp file in the same folder, then a rename.

A reader sees the old file or the new one, never a half-written one, even if the writer is
killed mid-write. Small state files are also fsynced so that they survive a machine crash.

A writer killed mid-write leaves its temp file (``.<name>.<12 hex digits>.tmp``) behind;
:func:`sweep_atomic_temps` removes those. It is only safe where no other process can be writing:
the server calls it at start, holding the workspace's lock (:func:`lock_exclusively`), before it
writes anything itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fl.log import adapter

__all__ = [
    "LockHeld",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "create_empty",
    "lock_exclusively",
    "read_json",
    "sweep_atomic_temps",
]

_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # exactly what _create_temp makes


class LockHeld(OSError):
    """Another process holds the lock."""


def _create_temp(target: Path) -> Path:
    """A new empty temp file beside ``target``, named ``.<name>.<12 hex digits>.tmp``."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` (with ``mode``), on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(target)  # "No space left on device" says which file could not be written
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True, mode: int = 0o644) -> None:
    with atomic_path(path, fsync=fsync, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), fsync=fsync)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def create_empty(path: str | os.PathLike[str]) -> None:
    """Create an empty file (if missing) and fsync its folder, so that it survives a crash.

    An empty file takes an inode and no data blocks: it can be made on a full disk.
    """
    target = Path(path)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    folder = os.open(target.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def lock_exclusively(path: str | os.PathLike[str]) -> int:
    """Take an exclusive lock on ``path`` (made if missing); returns its descriptor, which holds the lock.

    The kernel releases the lock when the descriptor is closed or the process dies, however it
    dies. Raises :class:`LockHeld`, naming the holder's pid, when another process holds it.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(f"{path} is locked by another process (pid {holder})") from None
    with contextlib.suppress(OSError):  # the pid is for the message above only; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def sweep_atomic_temps(root: str | os.PathLike[str], *, skip: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the temp files that :func:`atomic_path` leaves when killed mid-write, under ``root``.

    Only regular files whose names match exactly are removed; symlinks are not followed, and
    folders for which ``skip`` returns True are not entered. Call it only where no other process
    writes (see the module docstring). Returns the files removed.
    """
    removed: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if skip is not None:
            subfolders[:] = [d for d in subfolders if not skip(here / d)]
        for name in files:
            path = here / name
            if not _TEMP_NAME.fullmatch(name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(path.lstat().st_mode):
                    path.unlink()
                    removed.append(path)
    return removed


OWNER_FILE = ".owner"  # held with flock by the process that made the folder, for as long as it lives
STALE_GRACE_S = 30.0


def owned_folder(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new private folder ``parent/prefix*`` that carries a lock its process holds until it dies
    (``.owner``, flock), and the lock's descriptor (keep it open; close it after removing the folder).

    A process killed with SIGKILL cannot remove its folder; the kernel releases the lock however the
    process dies, so every call first removes the folders of ``prefix`` whose lock is free
    (:func:`sweep_owned_folders`)."""
    sweep_owned_folders(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(folder / OWNER_FILE, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else can hold it
    os.write(fd, f"{os.getpid()}\n".encode())
    return folder, fd


def sweep_owned_folders(parent: Path, prefix: str) -> list[Path]:
    """Remove this user's ``parent/prefix*`` folders whose owning process is gone; returns them."""
    removed = []
    now = time.time()
    for folder in parent.glob(f"{prefix}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            owner = folder / OWNER_FILE
            if not owner.exists():  # just made (its owner is about to lock it), or from an older fl
                if now - folder.stat().st_mtime > STALE_GRACE_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
                continue
            fd = os.open(owner, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            if now - owner.stat().st_mtime <= STALE_GRACE_S:  # never a folder whose owner is still starting
                continue
            adapter("fl").info("removing %s, left by a process of fl that no longer runs", folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
