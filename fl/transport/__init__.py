"""gRPC plumbing: the one place that creates channels and servers (sizes, keepalive, TLS)."""

from __future__ import annotations

import functools
import logging
import os
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "IdentityError",
    "PeerCertificate",
    "TLSConfig",
    "certificate_identity",
    "is_loopback",
    "make_channel",
    "make_server",
    "parse_certificate",
    "peer_certificate",
    "peer_identity",
]

log = logging.getLogger("fl.transport")

#: Bulk data moves in chunks of this size; every message stays far below MAX_MESSAGE_BYTES.
CHUNK_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_COMMON_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

_SERVER_OPTIONS = [
    *_COMMON_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

_CHANNEL_OPTIONS = [
    *_COMMON_OPTIONS,
    # Large windows: model transfers are bulk streams.
    ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class TLSConfig:
    """A participant's TLS folder: ``ca.crt``, ``tls.crt``, ``tls.key`` (see docs/operations.md)."""

    ca_cert: bytes
    cert: bytes
    key: bytes
    folder: Path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> TLSConfig:
        path = Path(folder)
        missing = [n for n in ("ca.crt", "tls.crt", "tls.key") if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"TLS folder {path} lacks {', '.join(missing)} (made by `fl provision`)")
        return cls(
            (path / "ca.crt").read_bytes(), (path / "tls.crt").read_bytes(), (path / "tls.key").read_bytes(), path
        )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1", "[::1]") or host.startswith("127.")


def make_server(address: str, *, tls: TLSConfig | None, max_workers: int = 256) -> tuple[grpc.Server, int]:
    """A gRPC server bound to ``address`` (``host:port``; port 0 picks one). Returns it and the port.

    With ``tls``, clients must present a certificate signed by the same CA (mutual TLS).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fl-rpc"),
        options=_SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_workers * 4,
    )
    if tls is None:
        host = address.rsplit(":", 1)[0]
        if not is_loopback(host):
            log.warning("INSECURE: serving without TLS on %s; anyone who can reach it can join", address)
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.key, tls.cert)], root_certificates=tls.ca_cert, require_client_auth=True
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def make_channel(target: str, *, tls: TLSConfig | None, server_name: str | None = None) -> grpc.Channel:
    """A channel to ``target`` (``host:port``); with ``tls``, presents the participant's certificate."""
    if tls is None:
        return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert, private_key=tls.key, certificate_chain=tls.cert
    )
    options: list[tuple[str, int | str]] = list(_CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


ROLE_SAN_SUFFIX = ".role.fl.invalid"
ROLES = ("server", "site", "admin")


class IdentityError(ValueError):
    """A certificate that does not say clearly who and what its holder is."""


@dataclass(frozen=True)
class PeerCertificate:
    """Who a certificate names (CN, role) and which certificate it is (issuer DER, serial) for the CRL."""

    name: str
    role: str
    serial: int
    issuer: bytes


@functools.lru_cache(maxsize=1024)
def parse_certificate(pem: bytes) -> PeerCertificate:
    """The :class:`PeerCertificate` of a PEM certificate (cached: every RPC presents its peer's).

    The role is the subject's OU (certificates from ``fl provision``) or a DNS SAN
    ``<role>.role.fl.invalid`` (certificates that Helm generates, which cannot carry an OU). When
    both are present they must agree; a certificate with neither, or with two roles, is refused.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    roles: set[str] = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)}
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        roles |= {
            n[: -len(ROLE_SAN_SUFFIX)] for n in sans.get_values_for_type(x509.DNSName) if n.endswith(ROLE_SAN_SUFFIX)
        }
    except x509.ExtensionNotFound:
        pass
    if not cn:
        raise IdentityError("certificate has no common name")
    if len(roles) != 1 or next(iter(roles)) not in ROLES:
        found = ", ".join(sorted(roles)) or "none"
        raise IdentityError(f"certificate of {cn!r} must name exactly one role of {', '.join(ROLES)}; found {found}")
    return PeerCertificate(cn, roles.pop(), cert.serial_number, cert.issuer.public_bytes())


def certificate_identity(pem: bytes) -> tuple[str, str]:
    """``(common name, role)`` of a participant's certificate (see :func:`parse_certificate`)."""
    cert = parse_certificate(pem)
    return cert.name, cert.role


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The peer's verified certificate; None on an insecure connection.

    Raises :class:`IdentityError` when the certificate does not name one role.
    """
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert")
    if not pem:
        return None
    return parse_certificate(bytes(pem[0]))


def peer_identity(context: grpc.ServicerContext) -> tuple[str, str] | None:
    """``(common name, role)`` of the peer's verified certificate; None on an insecure connection.

    Raises :class:`IdentityError` when the certificate does not name one role.
    """
    cert = peer_certificate(context)
    return None if cert is None else (cert.name, cert.role)
