"""``fl provision``: a project CA and a certificate and key for every participant.

Layout (see docs/operations.md)::

    OUT/ca/ca.crt, OUT/ca/ca.key              the project CA (keep ca.key offline)
    OUT/ca/crl.pem                            the revocation list, once something is revoked
    OUT/<name>/ca.crt, tls.crt, tls.key       one folder per participant (the server's: + crl.pem)

A certificate's subject CN is the participant's name and its OU the role (``server``, ``site``,
``admin``). Running again with more names adds them; the CA and existing certificates are kept,
so participants provisioned earlier stay valid. Private keys are written with mode 0600.

:func:`revoke` adds participants' certificates to a CRL signed by the project CA (no new CA
needed); the server refuses revoked certificates (see :mod:`fl.server.admission`).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Container, Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl.fsutil import atomic_write_bytes
from fl.transport import ROLE_SAN_SUFFIX, IdentityError, certificate_identity

__all__ = ["CRL_FILE", "ProvisionError", "Revocation", "provision", "revoke"]

#: The revocation list's file name, in the CA folder and in the server's TLS folder.
CRL_FILE = "crl.pem"
#: A CA key fl can sign with: its own (EC) or one that Helm's genCA made (RSA).
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

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


def _load_ca(folder: Path) -> tuple[x509.Certificate, CAKey]:
    """The CA in ``folder`` (``ca.crt`` and ``ca.key``); a clear error when it is missing or unusable."""
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if not (cert_path.exists() and key_path.exists()):
        raise ProvisionError(f"{folder} holds no project CA (ca.crt and ca.key); run fl provision --out there first")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ProvisionError(f"{key_path}: not an EC or RSA key")
    return cert, key


def _load_or_make_ca(folder: Path, project: str, days: int) -> tuple[x509.Certificate, CAKey, bool]:
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        return *_load_ca(folder), False
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
    ca_key: CAKey,
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
    except (ValueError, TypeError, InvalidSignature):
        return False


class Revocation(NamedTuple):
    """A certificate on the project's CRL: whose, its serial, and whether this call added it."""

    name: str
    serial: int
    added: bool


def _read_crl(ca_folder: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    """The project's current CRL (``ca/crl.pem``), checked to be this CA's; None before the first revocation."""
    path = ca_folder / CRL_FILE
    if not path.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise ProvisionError(f"{path}: not a PEM revocation list ({exc})") from None
    public_key = ca_cert.public_key()
    signed = isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) and crl.is_signature_valid(
        public_key
    )
    if crl.issuer != ca_cert.subject or not signed:
        raise ProvisionError(f"{path} is not signed by the CA in {ca_folder}; refusing to extend it")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's sequence number (0 when it has none); each list fl provision writes has a higher one."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def _write_crl(
    out: Path,
    ca: tuple[x509.Certificate, CAKey],
    revoked: dict[int, datetime.datetime],
    number: int,
    server_name: str,
    days: int,
) -> list[Path]:
    """Sign a CRL of ``revoked`` (serial: revocation time) and write it to the CA's and the server's folders."""
    ca_cert, ca_key = ca
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(_now() - datetime.timedelta(minutes=5))
        .next_update(_now() + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in sorted(revoked.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        builder = builder.add_revoked_certificate(entry)
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    targets = [out / "ca" / CRL_FILE]
    if (out / server_name / "tls.crt").exists():
        targets.append(out / server_name / CRL_FILE)
    for target in targets:
        atomic_write_bytes(target, pem)
    return targets


def _revoked_serials(crl: x509.CertificateRevocationList | None) -> dict[int, datetime.datetime]:
    return {entry.serial_number: entry.revocation_date_utc for entry in crl or []}


def _certificate_to_revoke(out: Path, name: str, ca_cert: x509.Certificate) -> x509.Certificate:
    """The certificate ``OUT/<name>/tls.crt``, or a clear error when there is none of this CA's."""
    path = out / name / "tls.crt"
    if not NAME.match(name) or name == "ca" or not path.is_file():
        known = sorted(p.parent.name for p in out.glob("*/tls.crt"))
        raise ProvisionError(
            f"cannot revoke {name!r}: no certificate {path} (provisioned in {out}: {', '.join(known) or 'none'})"
        )
    return _checked_certificate(path, ca_cert)


def _checked_certificate(path: Path, ca_cert: x509.Certificate) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot revoke {path}: not a readable PEM certificate ({exc})") from None
    if not _signed_by(path, ca_cert):
        raise ProvisionError(f"cannot revoke {path}: it is not signed by this project's CA")
    return cert


def _revocable_name(cert: x509.Certificate, source: Path) -> str:
    """The participant a certificate names; the server's own certificate is refused (sites read no CRL)."""
    try:
        name, role = certificate_identity(cert.public_bytes(serialization.Encoding.PEM))
    except IdentityError as exc:
        raise ProvisionError(f"cannot revoke {source}: {exc}") from None
    if role == "server":
        raise ProvisionError(
            f"cannot revoke {name!r}: it is the server's certificate, and sites do not read the revocation list; "
            "a leaked server key needs a new project CA"
        )
    return name


def revoke(
    out: Path,
    *,
    names: Sequence[str] = (),
    cert_files: Sequence[Path] = (),
    server_name: str = "server",
    crl_days: int = 365,
) -> list[Revocation]:
    """Add the certificates of ``names`` (``OUT/<name>/tls.crt``) and ``cert_files`` to the project's CRL.

    Writes ``OUT/ca/crl.pem`` and ``OUT/<server_name>/crl.pem``, signed by the project CA; a
    certificate already on the list is reported with ``added=False`` and nothing is rewritten.
    """
    if not names and not cert_files:
        raise ProvisionError("name at least one participant (or certificate file) to revoke")
    ca = _load_ca(out / "ca")
    ca_cert = ca[0]
    crl = _read_crl(out / "ca", ca_cert)
    revoked = _revoked_serials(crl)
    targets = [(out / name / "tls.crt", _certificate_to_revoke(out, name, ca_cert)) for name in names]
    targets += [(path, _checked_certificate(path, ca_cert)) for path in cert_files]
    results: list[Revocation] = []
    for source, cert in targets:
        name = _revocable_name(cert, source)
        added = cert.serial_number not in revoked
        revoked.setdefault(cert.serial_number, _now())
        results.append(Revocation(name, cert.serial_number, added))
    if any(r.added for r in results):
        _write_crl(out, ca, revoked, (crl_number(crl) if crl else 0) + 1, server_name, crl_days)
    return results


def provision(
    out: Path,
    *,
    server_name: str = "server",
    server_dns: list[str] | None = None,
    sites: list[str] | None = None,
    admins: list[str] | None = None,
    project: str = "fl",
    days: int = 825,
    crl_days: int = 365,
) -> list[tuple[str, Path, bool]]:
    """Make or extend a project's TLS material; returns ``(name, folder, created)`` per participant.

    A revocation list is kept (its entries) and renewed (new dates, next number); a participant whose
    certificate is on it is refused rather than silently given a new one.
    """
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
    crl = _read_crl(out / "ca", ca_cert)
    _refuse_revoked(out, [name for name, _ in participants], ca_cert, _revoked_serials(crl))
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
    if crl is not None:
        _write_crl(out, (ca_cert, ca_key), _revoked_serials(crl), crl_number(crl) + 1, server_name, crl_days)
    return written


def _refuse_revoked(out: Path, names: list[str], ca_cert: x509.Certificate, revoked: Container[int]) -> None:
    """Refuse to provision a participant whose current certificate is revoked (before anything is written)."""
    for name in names:
        cert_path = out / name / "tls.crt"
        if not (cert_path.exists() and _signed_by(cert_path, ca_cert)):
            continue
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        if serial in revoked:
            raise ProvisionError(
                f"the certificate of {name!r} (serial {serial:x}) is revoked; leave {name!r} out, or delete "
                f"{out / name} to issue it a new certificate"
            )
