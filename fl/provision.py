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

import base64
import datetime
import ipaddress
import json
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

__all__ = ["CRL_FILE", "ProvisionError", "Revocation", "check_helm_values", "provision", "revoke", "write_helm_values"]

#: The revocation list's file name, in the CA folder and in the server's TLS folder.
CRL_FILE = "crl.pem"
#: A CA key fl can sign with: its own (EC) or one that Helm's genCA made (RSA).
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
#: A site name the Helm chart accepts (its Deployment's name and fl/site label): a DNS label.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
#: The port the chart's server listens on by default (charts/fl values.yaml server.port).
HELM_SERVER_PORT = 8002
ROLES = ("server", "site", "admin")


class ProvisionError(ValueError):
    """Provisioning cannot proceed; the message says why."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def self_signed(name: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    """A builder of a certificate ``key`` signs for itself (a CA's, or the Kubernetes launcher's pinned one),
    valid from 5 minutes ago (clock skew) for ``days``; extensions are the caller's."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
    )


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
        self_signed(name, key, max(days, 3650))
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
    atomic_write_bytes(key_path, key_pem(key), mode=0o600)
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
    alt_names: list[x509.GeneralName] = [_alt_name(n) for n in dict.fromkeys(names)]
    if role == "server":
        alt_names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _alt_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address (a server dialled by IP, e.g. a node's NodePort), else a DNS SAN:
    TLS clients match an IP they dial only against IP address SANs."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


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
        atomic_write_bytes(folder / "tls.key", key_pem(key), mode=0o600)
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


def helm_secret_name(name: str) -> str:
    """The Kubernetes Secret name of a participant's TLS folder: ``<name>-tls`` as a DNS subdomain."""
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.") + "-tls"


def _tls_secret_manifest(folder: Path, secret: str, name: str, role: str) -> bytes:
    """A kubernetes.io/tls Secret (plus ca.crt) of a provisioned folder, the layout the chart mounts."""
    data = {key: base64.b64encode((folder / key).read_bytes()).decode() for key in ("ca.crt", "tls.crt", "tls.key")}
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret,
            "labels": {"app.kubernetes.io/part-of": "fl", "fl/role": role},
            "annotations": {"fl/tls-subject": f"CN={name}", "fl/tls-role": role},
        },
        "type": "kubernetes.io/tls",
        "data": data,
    }
    header = f"# The TLS Secret of {role} {name!r} (fl provision): kubectl apply -n NAMESPACE -f this file.\n"
    return (header + json.dumps(manifest, indent=2) + "\n").encode()


def _values_file(comment: str, values: dict[str, object]) -> bytes:
    """A Helm values file (JSON, which YAML reads) with a comment saying how to use it."""
    return ("".join(f"# {line}\n" for line in comment.splitlines()) + json.dumps(values, indent=2) + "\n").encode()


def _server_values(server_secret: str, admin_secret: str, external_names: list[str]) -> dict[str, object]:
    """The coordinator's release: the server only, reachable from outside, TLS from the Secrets."""
    return {
        "sites": [],
        "server": {"externalNames": external_names, "service": {"type": "LoadBalancer"}},
        "tls": {"mode": "existing", "existing": {"server": server_secret, "admin": admin_secret}},
        "job": {"submit": False},
    }


def _site_values(site: str, site_secret: str, address: str, verify_name: str) -> dict[str, object]:
    """A participant's release: one site, no server, dialing the coordinator's server."""
    return {
        "server": {"enabled": False},
        "externalServer": {"address": address, "serverName": verify_name},
        "tls": {"mode": "existing"},
        "sites": [{"name": site, "tlsSecret": site_secret}],
    }


def check_helm_values(
    *, server_name: str, sites: Sequence[str], admins: Sequence[str], external_names: Sequence[str], server_address: str
) -> str:
    """Refuse what the chart cannot take, before anything is written; returns the address sites dial."""
    if not admins:
        raise ProvisionError("--helm-values: name an admin (--admins): the server's release uses its Secret")
    if not external_names and not server_address:
        raise ProvisionError("--helm-values: give --server-dns NAME (the name sites dial) or --helm-server-address")
    address = server_address or f"{external_names[0]}:{HELM_SERVER_PORT}"
    if not re.fullmatch(r"[^:/\s]+:[0-9]{1,5}", address):
        raise ProvisionError(f"--helm-values: the server address {address!r} is not HOST:PORT")
    secrets: dict[str, str] = {}
    for name in [server_name, *sites, *admins]:
        if name in sites and not DNS_LABEL.match(name):
            raise ProvisionError(
                f"--helm-values: site name {name!r} is not a DNS label (lower-case letters, digits, '-', "
                "at most 40 characters), which the chart needs for its Deployment"
            )
        secret = helm_secret_name(name)
        if secret in secrets:
            raise ProvisionError(
                f"--helm-values: {name!r} and {secrets[secret]!r} both give the Secret name {secret!r}"
            )
        secrets[secret] = name
    return address


def write_helm_values(
    out: Path,
    target: Path,
    *,
    server_name: str,
    sites: Sequence[str],
    admins: Sequence[str],
    external_names: Sequence[str],
    server_address: str = "",
) -> list[Path]:
    """Write, per participant provisioned in ``out``, what its cluster needs for charts/fl.

    ``<name>-tls-secret.yaml`` (a kubernetes.io/tls Secret with ca.crt) for the server, each site and
    admin; ``<server>-values.yaml`` (server only, ``tls.mode: existing``, the first admin's Secret)
    and ``<site>-values.yaml`` (sites only, dialing ``server_address``, default the first external
    name at the chart's port). Returns the files written; Secrets are mode 0600 (they hold keys).
    """
    address = check_helm_values(
        server_name=server_name,
        sites=sites,
        admins=admins,
        external_names=external_names,
        server_address=server_address,
    )
    host = address.rsplit(":", 1)[0]
    # A host the server certificate does not name (an IP, another alias): verify its first DNS name.
    verify_name = "" if host in external_names or not external_names else external_names[0]
    participants = [(server_name, "server"), *((s, "site") for s in sites), *((a, "admin") for a in admins)]
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, role in participants:
        path = target / f"{name}-tls-secret.yaml"
        atomic_write_bytes(path, _tls_secret_manifest(out / name, helm_secret_name(name), name, role), mode=0o600)
        written.append(path)
    server_file = target / f"{server_name}-values.yaml"
    server_use = (
        f"The coordinator: kubectl apply -f {server_name}-tls-secret.yaml -f {admins[0]}-tls-secret.yaml\n"
        f"then helm install fl charts/fl -f {server_file.name} (a LoadBalancer; edit server.service or server.ingress)"
    )
    server = _server_values(helm_secret_name(server_name), helm_secret_name(admins[0]), list(external_names))
    atomic_write_bytes(server_file, _values_file(server_use, server))
    written.append(server_file)
    for site in sites:
        site_file = target / f"{site}-values.yaml"
        use = (
            f"Site {site}: kubectl apply -f {site}-tls-secret.yaml, then helm install fl charts/fl -f {site_file.name}"
        )
        atomic_write_bytes(
            site_file, _values_file(use, _site_values(site, helm_secret_name(site), address, verify_name))
        )
        written.append(site_file)
    return written
