"""Provisioning and certificate identities: who a peer is, and what role it has."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl.provision import ProvisionError, provision
from fl.transport import IdentityError, TLSConfig, certificate_identity


def test_provision_writes_a_folder_per_participant_with_private_keys_0600(tmp_path):
    written = provision(tmp_path, server_name="server", server_dns=["fl.example.org"], sites=["a", "b"], admins=["ops"])
    assert [(n, c) for n, _, c in written] == [("server", True), ("a", True), ("b", True), ("ops", True)]
    for name in ("server", "a", "b", "ops"):
        tls = TLSConfig.load(tmp_path / name)
        assert tls.ca_cert == (tmp_path / "ca" / "ca.crt").read_bytes()
        assert stat.S_IMODE((tmp_path / name / "tls.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    assert certificate_identity((tmp_path / "server/tls.crt").read_bytes()) == ("server", "server")
    assert certificate_identity((tmp_path / "a/tls.crt").read_bytes()) == ("a", "site")
    assert certificate_identity((tmp_path / "ops/tls.crt").read_bytes()) == ("ops", "admin")
    server = x509.load_pem_x509_certificate((tmp_path / "server/tls.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))


def test_adding_a_site_keeps_the_ca_and_the_other_certificates(tmp_path):
    provision(tmp_path, sites=["a"])
    before = {p: (tmp_path / p).read_bytes() for p in ("ca/ca.crt", "ca/ca.key", "a/tls.crt", "a/tls.key")}
    written = provision(tmp_path, sites=["a", "b"])
    assert [(n, c) for n, _, c in written] == [("server", False), ("a", False), ("b", True)]
    assert all((tmp_path / p).read_bytes() == data for p, data in before.items())
    ca = x509.load_pem_x509_certificate(before["ca/ca.crt"])
    x509.load_pem_x509_certificate((tmp_path / "b/tls.crt").read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.parametrize("bad", ["", "../x", "ca", "a b"])
def test_bad_names_are_refused(tmp_path, bad):
    with pytest.raises(ProvisionError):
        provision(tmp_path, sites=[bad])


def _cert(cn: str, ous: list[str], sans: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        + [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, o) for o in ous]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_role_comes_from_the_ou_or_from_the_helm_style_san():
    assert certificate_identity(_cert("site-1", ["site"], [])) == ("site-1", "site")
    assert certificate_identity(_cert("site-1", [], ["site-1", "site.role.fl.invalid"])) == ("site-1", "site")
    assert certificate_identity(_cert("op", ["admin"], ["admin.role.fl.invalid"])) == ("op", "admin")


@pytest.mark.parametrize(
    ("ous", "sans", "message"),
    [
        ([], ["site-1"], "found none"),
        (["site"], ["admin.role.fl.invalid"], "found admin, site"),
        (["root"], [], "found root"),
    ],
)
def test_certificates_without_one_clear_role_are_refused(ous, sans, message):
    with pytest.raises(IdentityError, match=message):
        certificate_identity(_cert("site-1", ous, sans))
