"""The gRPC servicers: thin; each RPC checks who is calling and hands off to a plain object.

With mutual TLS, a site is who its certificate says (CN), and admin RPCs need a certificate whose
role (OU) is ``admin``. Without TLS (simulator, loopback) a site is who it registered as.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc

from fl import __version__
from fl.log import adapter
from fl.proto import federation_pb2 as pb
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.server.jobs import JobRecord
from fl.server.jobstore import MAX_JOB_BYTES, JobError, extract_zip
from fl.server.sites import SiteSession
from fl.server.transfers import TransferError, storage_failure
from fl.transport import CHUNK_BYTES, IdentityError, peer_certificate
from fl.transport.bulk import UploadMeta

if TYPE_CHECKING:
    from fl.server.app import FLServer

__all__ = ["AdminServicer", "BulkServicer", "FederationServicer"]

log = adapter("fl.server", site="server")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")


def _abort(context: grpc.ServicerContext, code: str, message: str) -> NoReturn:
    context.abort(getattr(grpc.StatusCode, code), message)
    raise AssertionError("unreachable")  # context.abort raises


class _Base:
    def __init__(self, server: FLServer) -> None:
        self.server = server

    def _identity(self, context: grpc.ServicerContext) -> tuple[str, str] | None:
        """The caller's ``(name, role)``; a revoked certificate or a site off the allow-list is refused here."""
        if self.server.tls is None:
            return None
        try:
            cert = peer_certificate(context)
        except IdentityError as exc:
            _abort(context, "PERMISSION_DENIED", str(exc))
        if cert is None:
            _abort(context, "UNAUTHENTICATED", "a client certificate is required")
        refusal = self.server.admission.refusal(cert)
        if refusal is not None:
            _abort(context, "PERMISSION_DENIED", refusal)
        return cert.name, cert.role


class FederationServicer(_Base, pb_grpc.FederationServicer):
    def _session(
        self, context: grpc.ServicerContext, session_id: str, running_jobs: list[str] | None = None
    ) -> SiteSession | None:
        """The caller's session (None if unknown), touched only once the certificate proves it is its site's.

        Identity before state: a call with another site's session id is refused before it changes
        anything (last_seen, running_jobs, connected, queued directives).
        """
        identity = self._identity(context)
        session = self.server.registry.lookup(session_id)
        if session is None:
            return None
        if identity is not None and (identity[1] != "site" or identity[0] != session.name):
            log.warning("refused: certificate of %r (role %r) used with the session of %r", *identity, session.name)
            _abort(
                context,
                "PERMISSION_DENIED",
                f"certificate of {identity[0]!r} (role {identity[1]!r}) used with the session of {session.name!r}",
            )
        return self.server.registry.touch(session_id, running_jobs)

    def _site(self, context: grpc.ServicerContext, session_id: str) -> SiteSession:
        """The caller's checked and touched session; an unknown one aborts the call."""
        session = self._session(context, session_id)
        if session is None:
            _abort(context, "UNAUTHENTICATED", "unknown session: register again")
        return session

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        name = request.site_name
        if not SITE_NAME.match(name):
            _abort(context, "INVALID_ARGUMENT", f"bad site name {name!r}: letters, digits, '_', '.', '@', '-'")
        identity = self._identity(context)
        if identity is not None:
            cn, role = identity
            if role != "site":
                _abort(context, "PERMISSION_DENIED", f"certificate of {cn!r} has role {role!r}, not 'site'")
            if cn != name:
                _abort(context, "PERMISSION_DENIED", f"certificate is for {cn!r}; it cannot register as {name!r}")
        session = self.server.registry.register(name, list(request.running_jobs), request.accepts_custom_code)
        return pb.RegisterReply(
            session_id=session.session_id,
            heartbeat_interval_s=self.server.registry.heartbeat_interval,
            server_version=__version__,
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        session = self._session(context, request.session_id, list(request.running_jobs))
        if session is None:
            return pb.HeartbeatReply(known=False)
        stop = [j for j in request.running_jobs if not self.server.jobs.is_active_for(j, session.name)]
        return pb.HeartbeatReply(known=True, stop_jobs=stop)

    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollReply:
        if self._session(context, request.session_id) is None:
            return pb.PollReply(unknown_session=True)
        context.add_callback(lambda: self.server.registry.wake(request.session_id))  # caller gone: stop waiting
        return self.server.registry.poll(request.session_id, request.wait_s, context.is_active)

    def UploadStatus(self, request: pb.UploadStatusRequest, context: grpc.ServicerContext) -> pb.UploadReply:
        session = self._site(context, request.session_id)
        upload = self.server.uploads.status(request.upload_id, session.name)
        if upload is None:
            return pb.UploadReply(received=0, complete=False)
        return pb.UploadReply(received=upload.received, complete=upload.complete)

    def SubmitResult(self, request: pb.SubmitResultRequest, context: grpc.ServicerContext) -> pb.SubmitResultReply:
        session = self._site(context, request.session_id)
        accepted, message = self.server.broker.submit(session.name, request)
        if not accepted:
            log.warning("%s: %s", session.name, message, extra={"job": request.job_id})
        return pb.SubmitResultReply(accepted=accepted, message=message)

    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportReply:
        session = self._site(context, request.session_id)
        try:
            self.server.jobs.report(session.name, request)
        except PermissionError as exc:
            _abort(context, "PERMISSION_DENIED", str(exc))
        except TransferError as exc:
            _abort(context, exc.code, str(exc))
        return pb.ReportReply()


class BulkServicer(FederationServicer):
    """Raw-bytes model transfers (see :mod:`fl.transport.bulk`), with the same identity checks."""

    def download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        session = self._site(context, request.session_id)
        meter = self.server.metrics.transfers
        try:
            chunks = self.server.blobs.read(request.blob_id, session.name, request.offset)
            first = next(chunks, None)
        except TransferError as exc:
            meter.failed("download", session.name)
            _abort(context, exc.code, str(exc))
        if first is None:
            return
        context.send_initial_metadata((("fl-total-size", str(first[1])),))
        meter.moved("download", len(first[0]), session.name)
        yield first[0]
        try:
            for data, _ in chunks:
                meter.moved("download", len(data), session.name)
                yield data
        except TransferError as exc:
            meter.failed("download", session.name)
            _abort(context, exc.code, str(exc))

    def upload(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.UploadReply:
        try:
            meta = UploadMeta.from_metadata(context.invocation_metadata())
        except ValueError as exc:
            _abort(context, "INVALID_ARGUMENT", str(exc))
        session = self._site(context, meta.session_id)
        try:
            expected, max_bytes = self.server.broker.expectation(
                site=session.name, job_id=meta.job_id, task_id=meta.task_id
            )
            upload = self.server.uploads.begin(
                upload_id=meta.upload_id,
                site=session.name,
                job_id=meta.job_id,
                task_id=meta.task_id,
                offset=meta.offset,
                total_size=meta.total_size,
                checksum=meta.checksum,
                expected=expected,
                max_bytes=max_bytes,
                site_limit=self.server.broker.spool_limit(session.name),
            )
            try:
                for data in request_iterator:
                    self.server.uploads.write(upload, data)
                    self.server.metrics.transfers.moved("upload", len(data), session.name)
            finally:
                self.server.uploads.stream_ended(upload, streamed=upload.received - meta.offset)
            self.server.registry.touch(meta.session_id)
        except TransferError as exc:
            self.server.metrics.transfers.failed("upload", session.name)
            self.server.broker.note_refusal(
                site=session.name, job_id=meta.job_id, task_id=meta.task_id, reason=str(exc)
            )
            _abort(context, exc.code, str(exc))
        return pb.UploadReply(received=upload.received, complete=upload.complete)


class AdminServicer(_Base, pb_grpc.AdminServicer):
    def _admin(self, context: grpc.ServicerContext) -> str:
        identity = self._identity(context)
        if identity is None:
            if not self.server.allow_insecure_admin:
                _abort(context, "PERMISSION_DENIED", "admin commands need TLS with an admin certificate")
            return "local-admin"
        cn, role = identity
        if role != "admin":
            _abort(
                context, "PERMISSION_DENIED", f"certificate of {cn!r} has role {role!r}; admin commands need 'admin'"
            )
        return cn

    def _record(self, context: grpc.ServicerContext, job_id: str) -> JobRecord:
        record = self.server.jobs.get(job_id)
        if record is None:
            _abort(context, "NOT_FOUND", f"no job {job_id!r}")
        return record

    def SubmitJob(self, request_iterator: Iterator[pb.UploadMessage], context: grpc.ServicerContext) -> pb.JobInfo:
        admin = self._admin(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            _abort(context, "INVALID_ARGUMENT", "a job upload starts with its header")
        total = first.header.total_size
        if not 0 < total <= MAX_JOB_BYTES:
            _abort(context, "INVALID_ARGUMENT", f"job archive of {total} bytes (limit {MAX_JOB_BYTES})")
        staging: Path | None = None
        try:
            staging = Path(tempfile.mkdtemp(prefix="submit-", dir=self.server.staging_dir))
            archive = staging / "job.zip"
            received = 0
            with open(archive, "wb") as f:
                for message in request_iterator:
                    received += len(message.data)
                    if received > total:
                        _abort(context, "INVALID_ARGUMENT", "job archive larger than announced")
                    f.write(message.data)
            if received != total:
                _abort(context, "INVALID_ARGUMENT", f"job archive truncated: {received} of {total} bytes")
            try:
                extract_zip(archive, staging / "job")
                record = self.server.jobs.submit(staging / "job")
            except JobError as exc:
                _abort(context, "INVALID_ARGUMENT", f"job refused: {exc}")
            log.info("job %s submitted by %s", record.job_id, admin)
            return record.to_proto()
        except OSError as exc:  # the server's own disk (full, I/O error): not the admin's job
            failure = storage_failure(exc, "the job")
            log.error("job submitted by %s not stored: %s", admin, failure)
            _abort(context, failure.code, str(failure))
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsReply:
        self._admin(context)
        records = sorted(self.server.jobs.records.values(), key=lambda r: r.submitted)
        return pb.ListJobsReply(jobs=[r.to_proto() for r in records])

    def GetJob(self, request: pb.JobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        self._admin(context)
        return self._record(context, request.job_id).to_proto()

    def AbortJob(self, request: pb.JobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        admin = self._admin(context)
        self._record(context, request.job_id)
        record = self.server.jobs.abort(request.job_id, f"aborted by admin {admin}")
        assert record is not None
        return record.to_proto()

    def StreamLogs(self, request: pb.LogsRequest, context: grpc.ServicerContext) -> Iterator[pb.LogLine]:
        self._admin(context)
        record = self._record(context, request.job_id)
        folder = self.server.jobs.job_dir(record.job_id) / "logs"
        positions: dict[Path, int] = {}
        while True:
            files = sorted(folder.glob("*.log")) if folder.is_dir() else []
            if request.site:
                files = [f for f in files if f.stem == request.site]
            for path in files:
                with open(path, encoding="utf-8", errors="replace") as f:
                    f.seek(positions.get(path, 0))
                    while line := f.readline():
                        if not line.endswith("\n"):
                            break
                        positions[path] = f.tell()
                        yield pb.LogLine(site=path.stem, line=line.rstrip("\n"), job_id=record.job_id)
            if not request.follow or record.status in ("finished", "failed", "aborted") or not context.is_active():
                if request.follow and record.status in ("finished", "failed", "aborted"):
                    # One more pass picks up the last lines written before the job ended.
                    request.follow = False
                    continue
                return
            time.sleep(0.5)

    def DownloadResults(self, request: pb.JobRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        self._admin(context)
        record = self._record(context, request.job_id)
        job_dir = self.server.jobs.job_dir(record.job_id)
        with tempfile.TemporaryFile(dir=self.server.staging_dir) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for path in sorted(job_dir.rglob("*")):
                    rel = path.relative_to(job_dir)
                    if not path.is_file() or rel.parts[0] in ("job", "apps", "models") or path.name.startswith("."):
                        continue
                    zf.write(path, rel.as_posix())
            total = tmp.tell()
            tmp.seek(0)
            first = True
            while data := tmp.read(CHUNK_BYTES):
                yield pb.Chunk(data=data, total_size=total if first else 0)
                first = False

    def ListSites(self, request: pb.ListSitesRequest, context: grpc.ServicerContext) -> pb.ListSitesReply:
        self._admin(context)
        return pb.ListSitesReply(
            sites=[
                pb.SiteInfo(
                    name=s.name,
                    connected=s.connected,
                    last_seen=s.last_seen,
                    running_jobs=sorted(s.running_jobs),
                    registered=s.registered,
                )
                for s in self.server.registry.all_sessions()
            ]
        )
