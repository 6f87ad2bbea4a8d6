"""``fl provision``: a project CA and a certificate and key for every participant.

Layout (see docs/operations.md)::

    OUT/ca/ca.crt, OUT/ca/ca.key              the project CA (keep ca.key offline)
    OUT/<name>/ca.crt, tls.crt, tls.key       one folder per participant

A certificate's subject CN is the participant's name and its OU the role (``server``, ``site``,
``admin``). Running again with more names adds them; the CA and existing certificates are kept,
so participants provisioned earlier stay valid. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl.fsutil import atomic_write_bytes
from fl.transport import ROLE_SAN_SUFFIX

__all__ = ["ProvisionError", "provision"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
ROLES = ("server", "site", "admin")


class ProvisionError(ValueError):
    """Provisioning cannot proceed; the message says why."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _load_or_make_ca(
    folder: Path, project: str, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisionError(f"{key_path}: not an EC key made by fl provision")
        return cert, key, False
    if cert_path.exists() or key_path.exists():
        raise ProvisionError(f"{folder} holds only half of a CA (ca.crt and ca.key go together)")
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{project} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=max(days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, True


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    role: str,
    dns: list[str],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "server":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    # The role is also a DNS SAN, as in certificates the Helm chart generates (see fl.transport).
    names = [name, *dns, f"{role}{ROLE_SAN_SUFFIX}"]
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(names)]
    if role == "server":
        alt_names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _signed_by(cert_path: Path, ca_cert: x509.Certificate) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        return True
    except (ValueError, TypeError, x509.InvalidSignature):  # type: ignore[attr-defined]
        return False
    except Exception:
        return False


def provision(
    out: Path,
    *,
    server_name: str = "server",
    server_dns: list[str] | None = None,
    sites: list[str] | None = None,
    admins: list[str] | None = None,
    project: str = "fl",
    days: int = 825,
) -> list[tuple[str, Path, bool]]:
    """Make or extend a project's TLS material; returns ``(name, folder, created)`` per participant."""
    participants = [(server_name, "server")] + [(s, "site") for s in sites or []] + [(a, "admin") for a in admins or []]
    seen: set[str] = set()
    for name, _ in participants:
        if not NAME.match(name) or name in ("ca",):
            raise ProvisionError(f"bad participant name {name!r}: letters, digits, '_', '.', '@', '-' (not 'ca')")
        if name in seen:
            raise ProvisionError(f"{name!r} is named twice")
        seen.add(name)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, _ = _load_or_make_ca(out / "ca", project, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    written: list[tuple[str, Path, bool]] = []
    for name, role in participants:
        folder = out / name
        cert_path = folder / "tls.crt"
        if cert_path.exists() and (folder / "tls.key").exists() and _signed_by(cert_path, ca_cert):
            existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
            ous = existing.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            if ous and ous[0].value != role:
                raise ProvisionError(f"{name!r} already has a certificate with role {ous[0].value!r}, not {role!r}")
            written.append((name, folder, False))
            continue
        cert, key = _issue(ca_cert, ca_key, name, role, list(server_dns or []) if role == "server" else [], days)
        atomic_write_bytes(folder / "tls.key", _key_pem(key), mode=0o600)
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(folder / "ca.crt", ca_pem)
        written.append((name, folder, True))
    return written
