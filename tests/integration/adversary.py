"""An attacker with valid certificates: fl's own stubs speaking the protocol to a real TLS server.

The attack suite (``tests/integration/test_attack_*.py``) starts a real `fl server` with
:class:`~tests.integration.federation.Federation` and talks to it as a site would, but without the
site agent's good manners: registering, heartbeating, polling and uploading whatever it likes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from fl.checksum import Checksum
from fl.proto import federation_pb2 as pb
from fl.proto import federation_pb2_grpc as pb_grpc
from fl.transport import TLSConfig, make_channel
from fl.transport.bulk import BULK_UPLOAD_CHUNK_BYTES, BulkStub, UploadMeta
from tests.integration.federation import Federation

__all__ = ["Adversary"]


class Adversary:
    """A client holding ``name``'s certificate (or any TLS folder) of a :class:`Federation`."""

    def __init__(self, federation: Federation, name: str, *, tls: Path | None = None) -> None:
        self.name = name
        self.channel = make_channel(
            federation.address, tls=TLSConfig.load(tls or federation.tls / name), server_name="server"
        )
        self.stub = pb_grpc.FederationStub(self.channel)
        self.bulk = BulkStub(self.channel)
        self.session_id = ""

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Adversary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ control RPCs
    def register(self, site_name: str | None = None, *, running_jobs: list[str] | None = None) -> pb.RegisterReply:
        reply = self.stub.Register(
            pb.RegisterRequest(
                site_name=site_name or self.name, running_jobs=running_jobs or [], accepts_custom_code=True
            ),
            timeout=10,
        )
        self.session_id = reply.session_id
        return reply

    def heartbeat(self, session_id: str | None = None, running_jobs: list[str] | None = None) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(session_id=session_id or self.session_id, running_jobs=running_jobs or [])
        return self.stub.Heartbeat(request, timeout=10)

    def poll(self, wait_s: float = 1.0, session_id: str | None = None) -> pb.PollReply:
        request = pb.PollRequest(session_id=session_id or self.session_id, wait_s=wait_s)
        return self.stub.Poll(request, timeout=wait_s + 10)

    def poll_for(self, kind: str, timeout: float = 60.0) -> Any:
        """Poll until a directive of ``kind`` ("start_job", "task", "end_job") arrives; returns it."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.poll(1.0)
            if reply.WhichOneof("directive") == kind:
                return getattr(reply, kind)
        raise AssertionError(f"{self.name}: no {kind} directive within {timeout:.0f} s")

    def submit(
        self,
        task: pb.Task,
        *,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        upload_id: str = "",
        params_type: str = "FULL",
        error: str = "",
    ) -> pb.SubmitResultReply:
        request = pb.SubmitResultRequest(
            session_id=self.session_id,
            job_id=task.job_id,
            task_id=task.task_id,
            meta_json=json.dumps(meta or {}),
            metrics_json=json.dumps(metrics or {}),
            upload_id=upload_id,
            params_type=params_type,
            error=error,
        )
        return self.stub.SubmitResult(request, timeout=60)

    def report(
        self,
        job_id: str,
        *,
        logs: Sequence[str] = (),
        job_state: str = "",
        message: str = "",
        metrics: Sequence[pb.MetricRecord] = (),
    ) -> pb.ReportReply:
        import time

        request = pb.ReportRequest(
            session_id=self.session_id,
            job_id=job_id,
            logs=[pb.LogLine(line=line, time=time.time()) for line in logs],
            metrics=list(metrics),
            job_state=job_state,
            message=message,
        )
        return self.stub.Report(request, timeout=30)

    def upload_status(self, upload_id: str) -> pb.UploadReply:
        request = pb.UploadStatusRequest(session_id=self.session_id, upload_id=upload_id)
        return self.stub.UploadStatus(request, timeout=30)

    # ------------------------------------------------------------------ bulk
    def download(self, ref: pb.BlobRef) -> bytes:
        chunks = self.bulk.Download(
            pb.DownloadRequest(session_id=self.session_id, blob_id=ref.blob_id, offset=0), timeout=120
        )
        return b"".join(chunks)

    def upload(
        self,
        task: pb.Task,
        data: bytes,
        *,
        upload_id: str | None = None,
        offset: int = 0,
        total_size: int | None = None,
    ) -> tuple[str, pb.UploadReply]:
        """Upload ``data`` (from ``offset``) as a result of ``task``; returns ``(upload id, reply)``."""
        upload_id = upload_id or secrets.token_hex(8)
        digest = Checksum()
        digest.update(data)
        meta = UploadMeta(
            self.session_id,
            upload_id,
            task.job_id,
            task.task_id,
            offset,
            len(data) if total_size is None else total_size,
            digest.hexdigest(),
        )

        def chunks() -> Iterator[bytes]:
            for start in range(offset, len(data), BULK_UPLOAD_CHUNK_BYTES):
                yield data[start : start + BULK_UPLOAD_CHUNK_BYTES]

        reply = self.bulk.Upload(chunks(), metadata=meta.to_metadata(), timeout=120)
        return upload_id, reply


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of a failed call (None for other exceptions)."""
    return exc.code() if isinstance(exc, grpc.RpcError) else None  # type: ignore[no-any-return]
