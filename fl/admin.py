"""The admin client: submit jobs, watch them, fetch results (what ``fl submit|jobs|...`` use)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from fl.proto import federation_pb2 as pb
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.server.jobstore import extract_zip, read_job, zip_folder
from fl.transport import CHUNK_BYTES, TLSConfig, make_channel

__all__ = ["AdminClient", "AdminError", "job_info_dict"]

TERMINAL = ("finished", "failed", "aborted")


class AdminError(RuntimeError):
    """An admin request that failed; ``unreachable`` when the server could not be reached or refused us."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def job_info_dict(info: pb.JobInfo) -> dict[str, Any]:
    return {
        "job_id": info.job_id,
        "name": info.name,
        "status": info.status,
        "round": info.round,
        "num_rounds": info.num_rounds,
        "sites": list(info.sites),
        "message": info.message,
        "submitted": info.submitted,
        "started": info.started,
        "ended": info.ended,
        "summary": json.loads(info.summary_json or "{}"),
    }


class AdminClient:
    def __init__(self, server: str, *, tls: TLSConfig | None, server_name: str | None = None, timeout: float = 30.0):
        self.channel = make_channel(server, tls=tls, server_name=server_name)
        self.stub = pb_grpc.AdminStub(self.channel)
        self.timeout = timeout
        self.server = server

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc, self.server) from None

    def submit(self, job_dir: Path) -> pb.JobInfo:
        read_job(job_dir)  # a clear local error before anything is sent
        archive = zip_folder(job_dir)

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=pb.UploadHeader(total_size=len(archive)))
            for start in range(0, len(archive), CHUNK_BYTES):
                yield pb.UploadMessage(data=archive[start : start + CHUNK_BYTES])

        try:
            info: pb.JobInfo = self.stub.SubmitJob(messages(), timeout=max(self.timeout, 600))
            return info
        except grpc.RpcError as exc:
            raise _error(exc, self.server) from None

    def jobs(self) -> list[pb.JobInfo]:
        return list(self._call("ListJobs", pb.ListJobsRequest()).jobs)

    def job(self, job_id: str) -> pb.JobInfo:
        info: pb.JobInfo = self._call("GetJob", pb.JobRequest(job_id=job_id))
        return info

    def abort(self, job_id: str) -> pb.JobInfo:
        info: pb.JobInfo = self._call("AbortJob", pb.JobRequest(job_id=job_id))
        return info

    def sites(self) -> list[pb.SiteInfo]:
        return list(self._call("ListSites", pb.ListSitesRequest()).sites)

    def wait(self, job_id: str, timeout: float | None, poll: float = 1.0) -> pb.JobInfo:
        """Wait until the job ends (or ``timeout``); rides out a server restart."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                info = self.job(job_id)
                if info.status in TERMINAL:
                    return info
            except AdminError as exc:
                if not exc.unreachable:
                    raise
                info = None
            if deadline is not None and time.monotonic() > deadline:
                if info is None:
                    raise AdminError(f"server {self.server} unreachable at the deadline", unreachable=True)
                return info
            time.sleep(poll)

    def logs(self, job_id: str, site: str = "", follow: bool = False) -> Iterator[pb.LogLine]:
        try:
            yield from self.stub.StreamLogs(pb.LogsRequest(job_id=job_id, site=site, follow=follow))
        except grpc.RpcError as exc:
            raise _error(exc, self.server) from None

    def download(self, job_id: str, out: Path) -> list[str]:
        """Fetch the job's results into ``out``; returns the files written.

        The archive goes to a temporary file beside ``out`` (models can be larger than memory).
        """
        import tempfile
        import zipfile

        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as archive:
            try:
                for chunk in self.stub.DownloadResults(pb.JobRequest(job_id=job_id), timeout=max(self.timeout, 3600)):
                    archive.write(chunk.data)
            except grpc.RpcError as exc:
                raise _error(exc, self.server) from None
            archive.seek(0)
            with zipfile.ZipFile(archive) as zf:
                names = sorted(zf.namelist())
            archive.seek(0)
            extract_zip(archive, out, max_bytes=1 << 62)
        return names


def _error(exc: grpc.RpcError, server: str) -> AdminError:
    code = exc.code()
    unreachable = code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    detail = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        detail = f"cannot reach the server at {server}: {detail}"
    return AdminError(detail, unreachable=unreachable)
