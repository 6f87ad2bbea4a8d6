"""TLS for the Kubernetes launcher's link: a per-job ephemeral certificate that the job pod pins.

The relay makes a fresh self-signed certificate (EC P-256) for each job pod and serves the link
with it; its SHA-256 fingerprint goes to the pod in the job's Secret, next to the token. The pod's
shim accepts only a server whose certificate has exactly that fingerprint (no CA, no names: the
pin is the trust), then presents the token inside the encrypted link. The key never leaves the
relay's memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl.provision import key_pem, self_signed

__all__ = ["RelayCertificate", "RelayRefused", "dial", "fingerprint"]

#: How long a job's certificate is valid: longer than any job (it is made for one pod and dies with the relay).
VALID_DAYS = 60


class RelayRefused(ConnectionError):
    """The job pod will not talk to this peer (wrong certificate), or the relay refused the pod (wrong token)."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lowercase hex (what the pod pins)."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class RelayCertificate:
    """A job's ephemeral certificate and key (PEM) and the certificate's fingerprint."""

    cert_pem: bytes
    key_pem: bytes
    sha256: str

    @classmethod
    def generate(cls, name: str = "fl-kube-relay") -> RelayCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = self_signed(subject, key, VALID_DAYS).sign(key, hashes.SHA256())
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem(key), fingerprint(der))

    def server_context(self) -> ssl.SSLContext:
        """The relay's side: TLS 1.3 with this certificate (ssl loads a chain from files only: a private
        temporary folder, removed at once)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.options |= ssl.OP_NO_TICKET  # nothing to resume; no post-handshake writes from a reading thread
        with tempfile.TemporaryDirectory(prefix="fl-relay-tls-") as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(self.cert_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(self.key_pem)
            context.load_cert_chain(cert, key)
        return context


def dial(address: str, pinned: str, timeout: float = 60.0) -> ssl.SSLSocket:
    """The pod's side: a TLS connection to the relay at ``host:port`` whose certificate's SHA-256 is ``pinned``.

    Any other certificate (a stale relay, something else on that address, a man in the middle) is a
    :class:`RelayRefused` naming both fingerprints; nothing is sent to such a peer.
    """
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the pin below is the check: the certificate names no host
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock = context.wrap_socket(raw)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise RelayRefused(f"TLS handshake with the relay at {address} failed: {exc}") from None
    der = sock.getpeercert(binary_form=True) or b""
    got = fingerprint(der)
    if not hmac.compare_digest(got, pinned.strip().lower()):
        with contextlib.suppress(OSError):
            sock.close()
        raise RelayRefused(
            f"the relay at {address} presented a certificate with SHA-256 {got}, not the job's pinned {pinned}: "
            "refusing to talk to it (another process on that address, or an interception)"
        )
    sock.settimeout(None)
    return sock
