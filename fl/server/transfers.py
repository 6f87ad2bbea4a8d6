"""Bulk transfers: blobs the server offers for download, and uploads it spools to disk.

Downloads read the file from an offset in chunks (a broken download resumes where it stopped).
Uploads are written to a spool file as they arrive, checked on the fly (size, checksum, and for
model results the safetensors layout and finite values), and resume from the bytes already held.
Memory stays at a few chunks per transfer, whatever the model size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fl.checksum import Checksum, file_checksum
from fl.log import adapter
from fl.memory import release_memory
from fl.tensors import Layout, LayoutError, StreamChecker
from fl.transport.bulk import BULK_DOWNLOAD_CHUNK_BYTES

__all__ = [
    "HEADER_ALLOWANCE",
    "SPOOL_MODELS_PER_SITE",
    "Blob",
    "BlobStore",
    "TransferError",
    "Upload",
    "UploadManager",
    "site_spool_limit",
    "storage_failure",
]

# Room for a site's own safetensors header (names, metadata) on top of the tensor bytes.
HEADER_ALLOWANCE = 16 * 1024 * 1024
# Models' worth of spool one site's uploads may hold at once (several jobs may each await a result).
SPOOL_MODELS_PER_SITE = 2
# An upload stream that moved this much hands the memory its buffers used back to the system.
RELEASE_AFTER_BYTES = 8 * 1024 * 1024
# Errors of the server's own storage that more room (not a retry alone) cures.
_STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)

log = adapter("fl.server", site="server")


class TransferError(Exception):
    """A transfer request that cannot be served; ``code`` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Blob:
    blob_id: str
    path: Path
    size: int
    checksum: str
    sites: frozenset[str] | None  # None: any registered site


class BlobStore:
    """Files offered to sites by id; each blob lists the sites allowed to fetch it."""

    def __init__(self) -> None:
        self._blobs: dict[str, Blob] = {}
        self._hash_cache: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def add(self, path: Path, *, sites: frozenset[str] | None, checksum: str | None = None) -> Blob:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if checksum is None:
            with self._lock:
                checksum = self._hash_cache.get(key)
            if checksum is None:
                checksum = file_checksum(str(path)).hexdigest()
                with self._lock:
                    self._hash_cache[key] = checksum
        blob = Blob(secrets.token_hex(12), path, stat.st_size, checksum, sites)
        with self._lock:
            self._blobs[blob.blob_id] = blob
        return blob

    def remove(self, blob_id: str) -> None:
        with self._lock:
            blob = self._blobs.pop(blob_id, None)
            if blob is not None and not any(b.path == blob.path for b in self._blobs.values()):
                self._hash_cache = {k: v for k, v in self._hash_cache.items() if k[0] != str(blob.path)}

    def read(self, blob_id: str, site: str, offset: int) -> Iterator[tuple[bytes, int]]:
        """Chunks of a blob from ``offset``: ``(data, total size)``."""
        with self._lock:
            blob = self._blobs.get(blob_id)
        if blob is None:
            raise TransferError("NOT_FOUND", f"blob {blob_id} is not offered (expired or unknown)")
        if blob.sites is not None and site not in blob.sites:
            raise TransferError("PERMISSION_DENIED", f"blob {blob_id} is not for site {site}")
        if not 0 <= offset <= blob.size:
            raise TransferError("OUT_OF_RANGE", f"offset {offset} outside blob of {blob.size} bytes")
        try:
            f = open(blob.path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise TransferError("NOT_FOUND", f"blob {blob_id} no longer exists") from None
        with f:
            f.seek(offset)
            while True:
                data = f.read(BULK_DOWNLOAD_CHUNK_BYTES)
                if not data:
                    return
                yield data, blob.size


@dataclass
class Upload:
    upload_id: str
    site: str
    job_id: str
    task_id: str
    total_size: int
    path: Path
    checker: StreamChecker | None
    received: int = 0
    complete: bool = False
    active: float = field(default_factory=time.monotonic)  # last begin or write
    expected_checksum: str = ""
    checksum: Checksum = field(default_factory=Checksum)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str | None = None
    handle: BinaryIO | None = None
    ended: str = ""  # why the upload was dropped (replaced, its task closed, stale); its file is gone


def storage_failure(exc: OSError, what: str) -> TransferError:
    """The error a client gets when the server's own storage fails (disk full, I/O): not its fault.

    RESOURCE_EXHAUSTED for a full disk or quota, UNAVAILABLE otherwise; both say a retry may work.
    """
    code = "RESOURCE_EXHAUSTED" if exc.errno in _STORAGE_FULL else "UNAVAILABLE"
    return TransferError(code, f"the server cannot store {what}: {exc.strerror or exc}")


def site_spool_limit(largest_model_bytes: int) -> int:
    """Spool bytes a site's uploads may hold together: two of its largest model, plus header room."""
    return SPOOL_MODELS_PER_SITE * largest_model_bytes + HEADER_ALLOWANCE


class UploadManager:
    """Spools uploads to ``spool_dir``, resumable by upload id, checked as they stream in.

    Each site has at most one live upload per task (a new upload id replaces the old upload and
    deletes its spool file), and the sizes its uploads announced may not add up to more than the
    spool limit the caller gives (:func:`site_spool_limit`): a site cannot fill the server's disk.
    """

    def __init__(self, spool_dir: Path, *, stale_after: float = 3600.0) -> None:
        self.spool_dir = spool_dir
        self.stale_after = stale_after
        spool_dir.mkdir(parents=True, exist_ok=True)
        for leftover in spool_dir.glob("*.part"):  # from before a restart: nobody can resume them
            leftover.unlink(missing_ok=True)
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()

    def begin(
        self,
        *,
        upload_id: str,
        site: str,
        job_id: str,
        task_id: str,
        offset: int,
        total_size: int,
        checksum: str,
        expected: Layout | None,
        max_bytes: int,
        site_limit: int,
    ) -> Upload:
        """Start or resume an upload; ``offset`` must equal what the server already holds."""
        if not upload_id or len(upload_id) > 128 or not upload_id.replace("-", "").isalnum():
            raise TransferError("INVALID_ARGUMENT", "upload_id must be 1-128 letters, digits or '-'")
        if total_size < 0 or total_size > max_bytes:
            raise TransferError(
                "INVALID_ARGUMENT", f"upload of {total_size} bytes exceeds the {max_bytes} bytes allowed for it"
            )
        replaced: list[Upload] = []
        with self._lock:
            stale = self._expire_stale()
            upload = self._uploads.get(upload_id)
            if upload is None:
                if offset != 0:
                    raise TransferError("FAILED_PRECONDITION", "resume of an unknown upload; start again from 0")
                replaced = [u for u in self._uploads.values() if (u.site, u.task_id) == (site, task_id)]
                held = sum(u.total_size for u in self._uploads.values() if u.site == site) - sum(
                    u.total_size for u in replaced
                )
                if held + total_size > site_limit:
                    raise TransferError(
                        "RESOURCE_EXHAUSTED",
                        f"site {site}: upload of {total_size} bytes refused: its other uploads hold {held} bytes "
                        f"and a site's spool limit is {site_limit} bytes ({SPOOL_MODELS_PER_SITE} x the largest "
                        f"model it has a task for + {HEADER_ALLOWANCE} bytes of headers)",
                    )
                upload = Upload(
                    upload_id=upload_id,
                    site=site,
                    job_id=job_id,
                    task_id=task_id,
                    total_size=total_size,
                    path=self.spool_dir / f"{secrets.token_hex(8)}.part",
                    checker=StreamChecker(expected, max_bytes=total_size) if expected is not None else None,
                    expected_checksum=checksum,
                )
                upload.path.touch()
                for old in replaced:
                    del self._uploads[old.upload_id]
                self._uploads[upload_id] = upload
            elif (upload.site, upload.job_id, upload.task_id, upload.total_size) != (site, job_id, task_id, total_size):
                raise TransferError("PERMISSION_DENIED", "upload id belongs to another transfer")
            upload.active = time.monotonic()
        for old in replaced:
            self._drop(old, f"replaced by upload {upload_id} for the same task")
        for old in stale:
            self._drop(old, f"idle for more than {self.stale_after:.0f} s")
        if upload.error:
            raise TransferError("INVALID_ARGUMENT", upload.error)
        if offset != upload.received:
            raise TransferError(
                "FAILED_PRECONDITION", f"resume offset {offset} but the server holds {upload.received} bytes"
            )
        return upload

    def write(self, upload: Upload, data: bytes) -> None:
        """Append and check the next piece of an upload."""
        with upload.lock:
            if upload.ended:
                raise TransferError("ABORTED", f"upload {upload.upload_id} was {upload.ended}")
            if upload.complete:
                raise TransferError("FAILED_PRECONDITION", "upload already complete")
            if upload.received + len(data) > upload.total_size:
                raise TransferError("INVALID_ARGUMENT", "upload holds more bytes than announced")
            self._store(upload, data)  # first: a piece the disk refused is not counted anywhere
            if upload.checker is not None:
                try:
                    upload.checker.feed(data)
                except LayoutError as exc:
                    upload.error = f"rejected update: {exc}"
                    raise TransferError("INVALID_ARGUMENT", upload.error) from None
            upload.checksum.update(data)
            upload.received += len(data)
            upload.active = time.monotonic()
            if upload.received == upload.total_size:
                handle, upload.handle = upload.handle, None
                if handle is not None:
                    handle.close()
                if upload.checker is not None:
                    try:
                        upload.checker.finish()
                    except LayoutError as exc:
                        upload.error = f"rejected update: {exc}"
                        raise TransferError("INVALID_ARGUMENT", upload.error) from None
                if upload.expected_checksum and upload.checksum.hexdigest() != upload.expected_checksum:
                    upload.error = "upload's checksum does not match what the site sent"
                    raise TransferError("DATA_LOSS", upload.error)
                upload.complete = True

    def _store(self, upload: Upload, data: bytes) -> None:
        """Write a piece at ``upload.received`` in full, or not at all (call under the upload's lock).

        A failure of the server's own storage (disk full, I/O error) is the server's problem, not a
        fault of the site's update: the piece is cut off again and the site may retry it.
        """
        try:
            if upload.handle is None:
                # Unbuffered: what write() returns is on the file, so nothing fails later on close.
                upload.handle = open(upload.path, "r+b", buffering=0)  # noqa: SIM115 - closed when the upload ends
                upload.handle.seek(upload.received)
            view = memoryview(data)
            while view:
                written = upload.handle.write(view)
                if not written:  # a regular file takes at least one byte or raises; treat 0 as full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except OSError as exc:
            self._forget_piece(upload)
            failure = storage_failure(exc, "the upload")
            log.error(
                "%s: %s (%d of %d bytes held, in %s)",
                upload.site,
                failure,
                upload.received,
                upload.total_size,
                self.spool_dir,
                extra={"job": upload.job_id},
            )
            raise failure from None

    @staticmethod
    def _forget_piece(upload: Upload) -> None:
        """After a failed write: close the spool file and cut it back to the bytes counted."""
        if upload.handle is not None:
            with contextlib.suppress(OSError):
                upload.handle.close()
            upload.handle = None
        with contextlib.suppress(OSError):
            os.truncate(upload.path, upload.received)

    def stream_ended(self, upload: Upload, *, streamed: int) -> None:
        """One upload stream is over (complete or cut): release its file, and memory after a large one."""
        if not upload.complete:
            self.pause(upload)
        if streamed >= RELEASE_AFTER_BYTES:
            release_memory(collect=False)  # the stream's buffers, freed, would otherwise stay resident

    def pause(self, upload: Upload) -> None:
        """The stream broke: release the spool file until the upload resumes."""
        with upload.lock:
            if upload.handle is not None:
                upload.handle.close()
                upload.handle = None

    def status(self, upload_id: str, site: str) -> Upload | None:
        with self._lock:
            upload = self._uploads.get(upload_id)
        return upload if upload is not None and upload.site == site else None

    def take(self, upload_id: str, *, site: str, job_id: str, task_id: str) -> Upload:
        """Hand over a complete upload (its spool file becomes the caller's to delete)."""
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None or (upload.site, upload.job_id, upload.task_id) != (site, job_id, task_id):
                raise TransferError("NOT_FOUND", f"no upload {upload_id} for this task")
            if not upload.complete:
                raise TransferError(
                    "FAILED_PRECONDITION",
                    f"upload {upload_id} incomplete: {upload.received} of {upload.total_size} bytes",
                )
            del self._uploads[upload_id]
            return upload

    def discard_task(self, task_id: str) -> None:
        """Drop every upload of a task that is over (late or refused)."""
        with self._lock:
            doomed = [u for u in self._uploads.values() if u.task_id == task_id]
            for upload in doomed:
                del self._uploads[upload.upload_id]
        for upload in doomed:
            self._drop(upload, "discarded: its task is over")

    def spooled_bytes(self, site: str | None = None) -> int:
        """Bytes the live uploads (of ``site``, or of all sites) hold on disk now."""
        with self._lock:
            return sum(u.received for u in self._uploads.values() if site is None or u.site == site)

    def _drop(self, upload: Upload, reason: str) -> None:
        """End an upload already removed from the table: a writer still streaming gets ABORTED."""
        with upload.lock:
            upload.ended = reason
            if upload.handle is not None:
                upload.handle.close()
                upload.handle = None
            upload.path.unlink(missing_ok=True)

    def _expire_stale(self) -> list[Upload]:
        """Remove uploads idle for longer than ``stale_after`` (call under the lock; drop them after)."""
        now = time.monotonic()
        stale = [u for u in self._uploads.values() if now - u.active > self.stale_after]
        for upload in stale:
            del self._uploads[upload.upload_id]
        return stale


def remove_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
