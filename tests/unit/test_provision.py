"""Provisioning and certificate identities: who a peer is, and what role it has."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fl.provision import ProvisionError, Revocation, crl_number, provision, revoke
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


def test_a_server_address_given_as_an_ip_becomes_an_ip_san_that_tls_clients_match(tmp_path):
    provision(tmp_path, server_dns=["10.250.0.10", "fl.example.org"], sites=["a"])
    server = x509.load_pem_x509_certificate((tmp_path / "server/tls.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.250.0.10", "127.0.0.1"}
    assert "10.250.0.10" not in sans.get_values_for_type(x509.DNSName)
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)


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


# --- revocation (fl provision --revoke) -----------------------------------------------------------
def _crl(folder):
    return x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())


def _serial(out, name):
    return x509.load_pem_x509_certificate((out / name / "tls.crt").read_bytes()).serial_number


def test_revoke_writes_a_crl_signed_by_the_project_ca_with_the_serials_into_ca_and_server_folders(tmp_path):
    provision(tmp_path, sites=["a", "b", "c"], admins=["ops"])
    revoked = revoke(tmp_path, names=["b", "ops"])
    assert revoked == [Revocation("b", _serial(tmp_path, "b"), True), Revocation("ops", _serial(tmp_path, "ops"), True)]
    crl = _crl(tmp_path / "ca")
    assert (tmp_path / "server" / "crl.pem").read_bytes() == (tmp_path / "ca" / "crl.pem").read_bytes()
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    assert crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())
    assert {e.serial_number for e in crl} == {_serial(tmp_path, "b"), _serial(tmp_path, "ops")}
    assert crl_number(crl) == 1
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc


def test_revoking_again_is_idempotent_and_adding_a_name_keeps_the_earlier_entries(tmp_path):
    provision(tmp_path, sites=["a", "b"])
    revoke(tmp_path, names=["b"])
    first = (tmp_path / "ca" / "crl.pem").read_bytes()
    assert revoke(tmp_path, names=["b"]) == [Revocation("b", _serial(tmp_path, "b"), False)]
    assert (tmp_path / "ca" / "crl.pem").read_bytes() == first, "nothing new: the list is not rewritten"
    revoke(tmp_path, names=["a"])
    crl = _crl(tmp_path / "ca")
    assert {e.serial_number for e in crl} == {_serial(tmp_path, "a"), _serial(tmp_path, "b")}
    assert crl_number(crl) == 2


def test_revoking_a_certificate_file_names_its_participant(tmp_path):
    provision(tmp_path, sites=["a"])
    copy = tmp_path / "copied.crt"
    copy.write_bytes((tmp_path / "a" / "tls.crt").read_bytes())
    assert revoke(tmp_path, cert_files=[copy]) == [Revocation("a", _serial(tmp_path, "a"), True)]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["nobody"], r"cannot revoke 'nobody': no certificate .*nobody/tls.crt \(provisioned in .*: a, server\)"),
        (["../a"], "cannot revoke '../a'"),
        (["server"], "it is the server's certificate"),
        (["a", "nobody"], "cannot revoke 'nobody'"),
    ],
)
def test_revoking_an_unknown_name_or_the_server_fails_clearly_and_writes_nothing(tmp_path, names, message):
    provision(tmp_path, sites=["a"])
    with pytest.raises(ProvisionError, match=message):
        revoke(tmp_path, names=names)
    assert not (tmp_path / "ca" / "crl.pem").exists() and not (tmp_path / "server" / "crl.pem").exists()


def test_revoking_a_certificate_of_another_ca_or_without_a_ca_fails(tmp_path):
    provision(tmp_path / "ours", sites=["a"])
    provision(tmp_path / "theirs", sites=["a"])
    with pytest.raises(ProvisionError, match="not signed by this project's CA"):
        revoke(tmp_path / "ours", cert_files=[tmp_path / "theirs" / "a" / "tls.crt"])
    with pytest.raises(ProvisionError, match="holds no project CA"):
        revoke(tmp_path / "empty", names=["a"])


def test_reprovisioning_keeps_and_renews_the_crl_and_refuses_the_revoked_name(tmp_path):
    provision(tmp_path, sites=["a", "b"])
    revoke(tmp_path, names=["b"])
    b_serial = _serial(tmp_path, "b")
    written = provision(tmp_path, sites=["a", "c"])
    assert [(n, c) for n, _, c in written] == [("server", False), ("a", False), ("c", True)]
    crl = _crl(tmp_path / "ca")
    assert {e.serial_number for e in crl} == {b_serial} and crl_number(crl) == 2
    assert (tmp_path / "server" / "crl.pem").read_bytes() == (tmp_path / "ca" / "crl.pem").read_bytes()
    with pytest.raises(ProvisionError, match=r"certificate of 'b' \(serial [0-9a-f]+\) is revoked; leave 'b' out"):
        provision(tmp_path, sites=["b", "d"])
    assert not (tmp_path / "d").exists(), "nothing is issued when a name is refused"
    shutil.rmtree(tmp_path / "b")  # the documented way to give b a new certificate
    provision(tmp_path, sites=["b"])
    assert _serial(tmp_path, "b") != b_serial
    assert {e.serial_number for e in _crl(tmp_path / "ca")} == {b_serial}


def test_a_crl_that_the_ca_did_not_sign_is_not_extended(tmp_path):
    provision(tmp_path / "ours", sites=["a"])
    provision(tmp_path / "theirs", sites=["a"])
    revoke(tmp_path / "theirs", names=["a"])
    shutil.copy(tmp_path / "theirs" / "ca" / "crl.pem", tmp_path / "ours" / "ca" / "crl.pem")
    with pytest.raises(ProvisionError, match="is not signed by the CA"):
        revoke(tmp_path / "ours", names=["a"])


def test_cli_revoke_prints_serials_and_refuses_issuing_at_the_same_time(tmp_path, capsys):
    from fl.cli.main import main

    provision(tmp_path, sites=["a", "b"])
    assert main(["provision", "--out", str(tmp_path), "--revoke", "b"]) == 0
    out = capsys.readouterr().out
    assert "revoked b" in out and f"serial {_serial(tmp_path, 'b'):x}" in out and "server/crl.pem" in out
    assert main(["provision", "--out", str(tmp_path), "--revoke", "b"]) == 0
    assert "already b" in capsys.readouterr().out
    assert main(["provision", "--out", str(tmp_path), "--revoke", "x"]) == 2
    assert "cannot revoke 'x'" in capsys.readouterr().err
    assert main(["provision", "--out", str(tmp_path), "--revoke", "a", "--sites", "c"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_participant_folder_holding_another_cas_certificate_gets_a_new_one(tmp_path):
    provision(tmp_path / "ours", sites=["a"])
    provision(tmp_path / "theirs", sites=["a"])
    shutil.copy(tmp_path / "theirs" / "a" / "tls.crt", tmp_path / "ours" / "a" / "tls.crt")
    written = provision(tmp_path / "ours", sites=["a"])  # was: AttributeError (x509.InvalidSignature)
    assert ("a", True) in [(n, c) for n, _, c in written]
    ca = x509.load_pem_x509_certificate((tmp_path / "ours" / "ca" / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate((tmp_path / "ours" / "a" / "tls.crt").read_bytes()).verify_directly_issued_by(ca)


# --- fl provision --helm-values: what each cluster of a split deployment needs -----------------------
def _helm_template(values: Path, secret: Path) -> list[dict[str, Any]]:
    """Render charts/fl with a generated values file; the render and the Secret validate strictly."""
    import re
    import subprocess

    import yaml

    from tests.tools import find_tool

    chart = Path(__file__).resolve().parents[2] / "charts" / "fl"
    helm, validator = find_tool("helm"), find_tool("kubernetes-validate")
    render = subprocess.run(
        [helm, "template", "fl", str(chart), "-n", "fl", "-f", str(values)], capture_output=True, text=True, timeout=120
    )
    assert render.returncode == 0, render.stderr
    manifest = values.with_suffix(".rendered.yaml")
    manifest.write_text(render.stdout + "\n---\n" + secret.read_text())
    check = subprocess.run(
        [validator, "--strict", "--quiet", "-k", "1.25.0", str(manifest)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, f"{check.stdout}\n{check.stderr}"
    assert re.search(r"\bkind: Secret\b", render.stdout) is None, "existing TLS: the chart makes no Secret"
    return [doc for doc in yaml.safe_load_all(render.stdout) if doc]


def _mounted_tls_secrets(objs: list[dict[str, Any]]) -> dict[str, str]:
    """The TLS Secret each Deployment or Pod mounts as /etc/fl/tls, by component."""
    out: dict[str, str] = {}
    for obj in objs:
        spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj.get("spec", {})
        for volume in spec.get("volumes", []) if obj["kind"] in ("Deployment", "Pod") else []:
            if volume["name"] == "tls":
                out[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = volume["secret"]["secretName"]
    return out


def test_helm_values_make_a_server_only_and_a_sites_only_release_whose_secrets_match_the_mounts(tmp_path):
    import yaml

    from fl.cli.main import main

    prov, helm_dir = tmp_path / "prov", tmp_path / "helm"
    argv = ["provision", "--out", str(prov), "--server-dns", "fl.example.org", "--sites", "site-1,site-2"]
    assert main([*argv, "--admins", "admin@org", "--helm-values", str(helm_dir)]) == 0
    secrets = {p.name: yaml.safe_load(p.read_text()) for p in helm_dir.glob("*-tls-secret.yaml")}
    assert sorted(secrets) == [f"{n}-tls-secret.yaml" for n in ("admin@org", "server", "site-1", "site-2")]
    for file, secret in secrets.items():
        assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
        assert stat.S_IMODE((helm_dir / file).stat().st_mode) == 0o600, "a Secret manifest holds a private key"
    server_objs = _helm_template(helm_dir / "server-values.yaml", helm_dir / "server-tls-secret.yaml")
    assert _mounted_tls_secrets(server_objs) == {"server": "server-tls", "test": "admin-org-tls"}
    assert secrets["server-tls-secret.yaml"]["metadata"]["name"] == "server-tls"
    assert secrets["admin@org-tls-secret.yaml"]["metadata"]["name"] == "admin-org-tls"
    for site in ("site-1", "site-2"):
        objs = _helm_template(helm_dir / f"{site}-values.yaml", helm_dir / f"{site}-tls-secret.yaml")
        assert _mounted_tls_secrets(objs) == {"site": f"{site}-tls"}
        assert secrets[f"{site}-tls-secret.yaml"]["metadata"]["name"] == f"{site}-tls"
        (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--server") + 1] == "fl.example.org:8002"
        key = base64.b64decode(secrets[f"{site}-tls-secret.yaml"]["data"]["tls.key"])
        assert key == (prov / site / "tls.key").read_bytes()


def test_helm_values_verify_the_certificate_name_when_sites_dial_another_address(tmp_path):
    from fl.provision import write_helm_values

    provision(tmp_path / "prov", server_dns=["fl.example.org"], sites=["a"], admins=["ops"])
    write_helm_values(
        tmp_path / "prov",
        tmp_path / "helm",
        server_name="server",
        sites=["a"],
        admins=["ops"],
        external_names=["fl.example.org"],
        server_address="203.0.113.10:443",
    )
    values = json.loads("".join(line for line in (tmp_path / "helm/a-values.yaml").open() if not line.startswith("#")))
    assert values["externalServer"] == {"address": "203.0.113.10:443", "serverName": "fl.example.org"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sites", "Site_1", "--admins", "ops", "--server-dns", "x"], "site name 'Site_1' is not a DNS label"),
        (["--sites", "a", "--server-dns", "x"], "name an admin (--admins)"),
        (["--sites", "a", "--admins", "ops"], "give --server-dns NAME"),
        (["--sites", "a", "--admins", "ops", "--helm-server-address", "x"], "'x' is not HOST:PORT"),
        (["--sites", "a", "--admins", "ops@x,ops-x", "--server-dns", "x"], "both give the Secret name"),
    ],
)
def test_helm_values_refuse_what_the_chart_cannot_take_before_writing_anything(tmp_path, capsys, extra, message):
    from fl.cli.main import main

    assert main(["provision", "--out", str(tmp_path / "prov"), *extra, "--helm-values", str(tmp_path / "h")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "prov").exists() and not (tmp_path / "h").exists()
