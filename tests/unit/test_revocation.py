"""The server's revocation list and allow-list (fl.server.admission), without a network."""

from __future__ import annotations

import datetime
import logging
import re
import shutil
from pathlib import Path

import pytest

from fl.provision import provision, revoke
from fl.server.admission import MAX_CRL_BYTES, Admission, RevocationListError, parse_revocation_list
from fl.transport import PeerCertificate, parse_certificate


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    provision(tmp_path / "pki", sites=["a", "b", "c"], admins=["ops"])
    return tmp_path / "pki"


def _cert(pki: Path, name: str) -> PeerCertificate:
    return parse_certificate((pki / name / "tls.crt").read_bytes())


def _ca(pki: Path) -> bytes:
    return (pki / "ca" / "ca.crt").read_bytes()


def _admission(pki: Path, expelled: list[str] | None = None, **kwargs: object) -> Admission:
    sink = expelled if expelled is not None else []
    return Admission(
        _ca(pki),
        pki / "server" / "crl.pem",
        on_revoked=lambda name, reason: sink.append(name),
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_crl_of_the_project_ca_lists_the_revoked_serials(pki):
    revoke(pki, names=["b"])
    crl = parse_revocation_list((pki / "ca" / "crl.pem").read_bytes(), _ca(pki))
    assert crl.serials == {_cert(pki, "b").serial} and crl.number == 1
    assert crl.revokes(_cert(pki, "b")) and not crl.revokes(_cert(pki, "a"))


def test_lists_that_are_not_the_project_cas_or_oversized_are_refused_but_an_expired_one_is_not(pki, tmp_path):
    revoke(pki, names=["b"])
    good = (pki / "ca" / "crl.pem").read_bytes()
    provision(tmp_path / "same-name", sites=["b"])  # another CA with the same subject "fl CA"
    revoke(tmp_path / "same-name", names=["b"])
    provision(tmp_path / "other", sites=["b"], project="other")
    revoke(tmp_path / "other", names=["b"])
    cases = {
        "signature does not verify": (tmp_path / "same-name" / "ca" / "crl.pem").read_bytes(),
        "issued by 'CN=other CA', not by the project CA": (tmp_path / "other" / "ca" / "crl.pem").read_bytes(),
        "not a PEM certificate revocation list": b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        "over the limit": b"x" * (MAX_CRL_BYTES + 1),
    }
    for message, pem in cases.items():
        with pytest.raises(RevocationListError, match=message):
            parse_revocation_list(pem, _ca(pki))
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=400)
    expired = parse_revocation_list(good, _ca(pki), now=later)  # revocations never lapse
    assert expired.expired(later) and not expired.expired()
    assert expired.serials == {_cert(pki, "b").serial}


def test_an_expired_list_is_enforced_at_start_and_warned_about_at_load_and_every_refresh(pki, caplog):
    revoke(pki, names=["b"], crl_days=0)  # its next-update is now: expired when the server reads it
    admission = _admission(pki)
    with caplog.at_level(logging.WARNING, logger="fl.server"):
        admission.load_initial()  # the server starts (a year after provisioning: no crash loop)
        b = _cert(pki, "b")
        assert admission.refusal(b) == f"certificate of 'b' (serial {b.serial:x}) is revoked"
        warning = (
            r"crl.pem: revocation list expired on 20.*; it is still enforced .*renew it with `fl provision --out DIR`"
        )
        assert len(re.findall(warning, caplog.text)) == 1
        assert not admission.reload("refresh")
        assert len(re.findall(warning, caplog.text)) == 2, "warned again at the refresh"
        assert admission.refusal(b) is not None

        revoke(pki, names=["c"])  # renewed (with one more revocation): the warnings stop
        caplog.clear()
        assert admission.reload("refresh") and admission.current.number == 2
        assert not admission.reload("refresh")
        assert "expired" not in caplog.text
        assert admission.refusal(b) is not None and admission.refusal(_cert(pki, "c")) is not None


def test_revoked_certificates_and_sites_off_the_allow_list_are_refused_naming_them(pki):
    revoke(pki, names=["b", "ops"])
    admission = _admission(pki, allowed_sites=["a", "b"])
    admission.load_initial()
    b, ops = _cert(pki, "b"), _cert(pki, "ops")
    assert admission.refusal(b) == f"certificate of 'b' (serial {b.serial:x}) is revoked"
    assert admission.refusal(ops) == f"certificate of 'ops' (serial {ops.serial:x}) is revoked"
    assert admission.refusal(_cert(pki, "c")) == "site 'c' is not on this server's allowed sites (a, b)"
    assert admission.refusal(_cert(pki, "a")) is None


def test_a_new_list_expels_the_sites_it_revokes_and_a_bad_one_keeps_the_old(pki, tmp_path):
    expelled: list[str] = []
    admission = _admission(pki, expelled)
    admission.load_initial()  # no list yet: nothing revoked
    for name in ("a", "b", "c"):
        assert admission.refusal(_cert(pki, name)) is None
    revoke(pki, names=["b"])
    assert admission.reload("SIGHUP") and expelled == ["b"]
    in_force = admission.current
    provision(tmp_path / "other", sites=["a"])
    revoke(tmp_path / "other", names=["a"])
    shutil.copy(tmp_path / "other" / "server" / "crl.pem", pki / "server" / "crl.pem")
    assert not admission.reload("SIGHUP") and admission.current is in_force
    assert admission.refusal(_cert(pki, "a")) is None and admission.refusal(_cert(pki, "b")) is not None
    (pki / "server" / "crl.pem").unlink()
    assert not admission.reload("refresh") and admission.current is in_force, "a deleted list un-revokes nothing"
    assert expelled == ["b"]


def test_an_older_list_is_refused(pki, tmp_path):
    revoke(pki, names=["b"])
    older = (pki / "server" / "crl.pem").read_bytes()
    revoke(pki, names=["c"])
    admission = _admission(pki)
    admission.load_initial()
    (pki / "server" / "crl.pem").write_bytes(older)
    assert not admission.reload("SIGHUP")
    assert admission.current.number == 2 and admission.refusal(_cert(pki, "c")) is not None


def test_a_bad_list_at_start_or_a_missing_explicit_one_stops_the_server_from_starting(pki, tmp_path):
    (pki / "server" / "crl.pem").write_bytes(b"not a list")
    with pytest.raises(RevocationListError, match=r"server/crl.pem: it is not a PEM certificate revocation list"):
        _admission(pki).load_initial()
    with pytest.raises(RevocationListError, match="no such file"):
        Admission(_ca(pki), tmp_path / "missing.pem", required=True).load_initial()
