"""One download of a model for the simulated sites of one machine, hard-linked to each site that gets it.

The simulator's sites run on one machine and get the same global model each round: each site's
agent would otherwise stream the same bytes from the server into a file of its own in /dev/shm.
With :class:`SharedDownloads`, the first site to want a blob (by its checksum and size) downloads
it; a site that wants the same blob meanwhile waits for that download (a file lock, so the sites'
processes coordinate too) and then hard-links the file into its own exchange folder: one copy of
the model in memory, one stream from the server. Each site still removes its own link as before;
the file's memory goes with the last link. A site that finds no usable file (the first site's
download failed, or its script already removed the file) downloads the blob itself, as without
sharing. Only unfiltered downloads are shared (a site's data filters may rewrite its file).

A job's app (its config and custom code) is unpacked once for the sites that get the same archive
(:meth:`SharedDownloads.unpacked`): each site's job folder links to that one copy, so that starting
a job on hundreds of simulated sites does not write their app's files hundreds of times (~20-40 ms
a site here). Scripts run in their site's own job folder and write there, as everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from fl.fsutil import atomic_write_bytes

__all__ = ["SharedDownloads"]

_KEY = re.compile(r"^[0-9a-zA-Z-]{1,16}:[0-9a-f]{8,128}$")  # a checksum as fl.checksum writes it


class SharedDownloads:
    """Coordinates the downloads of the sites that share ``folder`` (which holds only small index files)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def fetch(self, checksum: str, size: int, dest: Path, download: Callable[[], None]) -> bool:
        """Make ``dest`` the blob of ``checksum`` and ``size``: a link to another site's copy if one
        is there (returns True), else by calling ``download()`` (which writes ``dest``; returns False)."""
        if not _KEY.match(checksum):  # never a path of its own: the checksum names the index files
            download()
            return False
        key = checksum.replace(":", "-")
        with self._locked(key):
            if self._link_existing(key, size, dest):
                return True
            download()
            self._publish(key, dest)
            return False

    def unpacked(self, checksum: str, unpack: Callable[[Path], None]) -> Path | None:
        """The folder that ``unpack(folder)`` fills for the archive of ``checksum``, filled once for every
        site sharing this index (the others wait for it, then get the same folder); None for a checksum
        that cannot name a folder (the caller unpacks its own)."""
        if not _KEY.match(checksum):
            return None
        key = checksum.replace(":", "-")
        apps = self.folder / "apps"
        done = apps / key
        with self._locked(f"app-{key}"):
            if done.is_dir():
                return done
            apps.mkdir(exist_ok=True)
            partial = apps / f".{key}.{os.getpid()}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                unpack(partial)
                os.rename(partial, done)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            return done

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while the first site downloads; the others wait here
            yield
        finally:
            os.close(fd)  # releases the lock

    def _link_existing(self, key: str, size: int, dest: Path) -> bool:
        try:
            source = Path((self.folder / f"{key}.src").read_text())
        except (OSError, UnicodeDecodeError):
            return False
        try:
            dest.unlink(missing_ok=True)
            os.link(source, dest)
        except OSError:  # gone (its script loaded and removed it) or elsewhere: download it ourselves
            return False
        if dest.stat().st_size != size:
            dest.unlink(missing_ok=True)
            return False
        return True

    def _publish(self, key: str, dest: Path) -> None:
        """Name ``dest`` as the copy of the blob ``key`` (and forget the copies of older blobs)."""
        for old in self.folder.glob("*.src"):
            if old.stem != key:
                old.unlink(missing_ok=True)
                (self.folder / f"{old.stem}.lock").unlink(missing_ok=True)
        atomic_write_bytes(self.folder / f"{key}.src", str(dest).encode(), fsync=False)
