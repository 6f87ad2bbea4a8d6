"""The bulk-data service: gRPC streams of raw byte chunks (no protobuf wrapping of the data).

Models and results are the largest things fl moves; wrapping each chunk in a protobuf message
costs a copy of every byte on each side (measured here: 1.5x the CPU of raw streams). So the two
bulk methods carry raw bytes, with their small headers in protobuf requests or call metadata:

- ``/fl.v1.Bulk/Download``: request :class:`DownloadRequest` -> stream of raw chunks; the initial
  metadata ``fl-total-size`` gives the blob's size.
- ``/fl.v1.Bulk/Upload``: stream of raw chunks -> :class:`UploadReply`; the header is call metadata
  (``fl-session``, ``fl-upload-id``, ``fl-job``, ``fl-task``, ``fl-offset``, ``fl-total-size``,
  ``fl-checksum``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from fl.proto import federation_pb2 as pb

__all__ = [
    "BULK_DOWNLOAD_CHUNK_BYTES",
    "BULK_SERVICE",
    "BULK_UPLOAD_CHUNK_BYTES",
    "BulkStub",
    "UploadMeta",
    "bulk_handler",
]

BULK_SERVICE = "fl.v1.Bulk"
#: Chunk sizes of bulk streams. Each message of a client stream costs the sync gRPC server a
#: hand-off between threads, so uploads move fastest in large chunks (measured here with 1 GiB:
#: 1 MiB 3.2 s, 4 MiB 2.2 s, 8 MiB 1.8 s); downloads were as fast at 4 MiB as at 8.
BULK_DOWNLOAD_CHUNK_BYTES = 4 << 20
BULK_UPLOAD_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class UploadMeta:
    session_id: str
    upload_id: str
    job_id: str
    task_id: str
    offset: int
    total_size: int
    checksum: str

    def to_metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("fl-session", self.session_id),
            ("fl-upload-id", self.upload_id),
            ("fl-job", self.job_id),
            ("fl-task", self.task_id),
            ("fl-offset", str(self.offset)),
            ("fl-total-size", str(self.total_size)),
            ("fl-checksum", self.checksum),
        )

    @classmethod
    def from_metadata(cls, metadata: tuple[tuple[str, str | bytes], ...]) -> UploadMeta:
        """Parse call metadata; raises ValueError naming what is missing or malformed."""
        values = {k: v.decode() if isinstance(v, bytes) else v for k, v in metadata}
        missing = [
            k
            for k in ("fl-session", "fl-upload-id", "fl-job", "fl-task", "fl-offset", "fl-total-size")
            if k not in values
        ]
        if missing:
            raise ValueError(f"upload metadata lacks {', '.join(missing)}")
        try:
            offset, total = int(values["fl-offset"]), int(values["fl-total-size"])
        except ValueError:
            raise ValueError("fl-offset and fl-total-size must be integers") from None
        return cls(
            values["fl-session"],
            values["fl-upload-id"],
            values["fl-job"],
            values["fl-task"],
            offset,
            total,
            values.get("fl-checksum", ""),
        )


DownloadHandler = Callable[[pb.DownloadRequest, grpc.ServicerContext], Iterator[bytes]]
UploadHandler = Callable[[Iterator[bytes], grpc.ServicerContext], pb.UploadReply]


def bulk_handler(download: DownloadHandler, upload: UploadHandler) -> grpc.GenericRpcHandler:
    """The server side: raw-bytes responses for Download, raw-bytes requests for Upload."""
    return grpc.method_handlers_generic_handler(
        BULK_SERVICE,
        {
            "Download": grpc.unary_stream_rpc_method_handler(
                download, request_deserializer=pb.DownloadRequest.FromString
            ),
            "Upload": grpc.stream_unary_rpc_method_handler(
                upload, response_serializer=pb.UploadReply.SerializeToString
            ),
        },
    )


class BulkStub:
    """The client side of the bulk service."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Download = channel.unary_stream(
            f"/{BULK_SERVICE}/Download", request_serializer=pb.DownloadRequest.SerializeToString
        )
        self.Upload = channel.stream_unary(f"/{BULK_SERVICE}/Upload", response_deserializer=pb.UploadReply.FromString)
