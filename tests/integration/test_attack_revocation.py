"""Revocation without a new CA, against a real `fl server` with mutual TLS.

A revoked site cannot register, loses the session it had, and the job finishes without it; the
server picks up a new list on SIGHUP and at its refresh interval; a list that the project CA did not
sign is refused while the list in force stays; an expired list of the CA is enforced with a warning at
every refresh (revocations never lapse); an allow-list keeps other sites out. Every refusal names the
certificate and why.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509

from fl.provision import provision, revoke
from tests.integration.adversary import Adversary, status_code
from tests.integration.federation import Federation, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, ["site-1", "site-2", "site-3", "site-4"])
    yield fed
    fed.stop()


def _serial(fed: Federation, name: str) -> int:
    return x509.load_pem_x509_certificate((fed.tls / name / "tls.crt").read_bytes()).serial_number


def _refused(call: object, *args: object) -> grpc.RpcError:
    """The error of a call that must be refused with PERMISSION_DENIED."""
    try:
        call(*args)  # type: ignore[operator]
    except grpc.RpcError as exc:
        assert status_code(exc) == grpc.StatusCode.PERMISSION_DENIED, exc
        return exc
    raise AssertionError(f"{call} was not refused")


def _sighup(fed: Federation) -> None:
    assert fed.server is not None and fed.server.proc is not None
    fed.server.proc.send_signal(signal.SIGHUP)


def test_a_site_revoked_mid_job_is_cut_off_at_sighup_and_the_job_finishes_without_it(federation, tmp_path, make_job):
    fed = federation
    server = fed.start_server()
    server.wait_for_log(r"no revocation list at .*server/crl.pem", 10)
    sites = {name: fed.start_site(name) for name in ("site-1", "site-2", "site-3")}
    fed.wait_sites(list(sites))
    with Adversary(fed, "site-4") as idle:
        idle.register()
        assert idle.heartbeat().known
        job = make_job(sites=3, rounds=3, min_clients=2, script_args={s: "--sleep 2" for s in sites})
        job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
        sites["site-3"].wait_for_log("task train received", 120)

        revoke(fed.tls, names=["site-3", "site-4"])  # writes tls/ca/crl.pem and tls/server/crl.pem
        _sighup(fed)
        server.wait_for_log(r"revocation list .*crl.pem reloaded \(SIGHUP\): 2 revoked, number 1", 30)
        server.wait_for_log(r"site site-3 expelled: its certificate \(serial [0-9a-f]+\) was revoked", 30)

        # The session site-4 already had stops working at its next RPC ...
        try:
            assert idle.poll(0.5).unknown_session, "the revoked site's session still polls"
        except grpc.RpcError as exc:
            assert status_code(exc) == grpc.StatusCode.PERMISSION_DENIED and "is revoked" in str(exc.details())
        # ... and registering again is refused, naming the certificate.
        refused = _refused(idle.register)
        assert refused.details() == f"certificate of 'site-4' (serial {_serial(fed, 'site-4'):x}) is revoked"

    sites["site-3"].wait_for_log(r"cannot register with .*certificate of 'site-3' \(serial [0-9a-f]+\) is revoked", 60)
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 240, "the job to end")
    assert final["status"] == "finished", final["message"]
    download = fed.fl("download", job_id, "-o", str(tmp_path / "out"))
    assert download.returncode == 0, download.stderr
    weight = torch.load(tmp_path / "out" / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(weight, torch.full((16,), 3.0)), "every round applied once, by the remaining sites"
    connected = {s["name"]: s["connected"] for s in fed.fl_json("sites")}
    assert connected["site-1"] and connected["site-2"] and not connected["site-3"] and not connected["site-4"]


def test_a_list_the_ca_did_not_sign_is_refused_and_an_expired_one_is_enforced_with_warnings(federation, tmp_path):
    fed = federation
    revoke(fed.tls, names=["site-2"])
    server = fed.start_server("--crl-refresh", "1")
    server.wait_for_log(r"revocation list .*server/crl.pem loaded: 1 revoked, number 1, next update 20", 10)
    with Adversary(fed, "site-1") as site_1, Adversary(fed, "site-2") as site_2, Adversary(fed, "site-3") as site_3:
        site_1.register()
        assert "certificate of 'site-2'" in _refused(site_2.register).details()

        # A forged list: another CA named like ours ("fl CA") revokes site-1 and forgets site-2.
        provision(tmp_path / "forger", sites=["site-1"])
        forged = tmp_path / "forger"
        revoke(forged, names=["site-1"])
        (fed.tls / "server" / "crl.pem").write_bytes((forged / "ca" / "crl.pem").read_bytes())
        _sighup(fed)
        server.wait_for_log(
            r"REFUSED revocation list .*\(SIGHUP\): its signature does not verify .*; "
            r"keeping the one in force \(1 revoked, number 1",
            30,
        )
        assert site_1.heartbeat().known
        _refused(site_2.register)

        # An expired list of the right CA, picked up by the refresh interval alone (no SIGHUP): it is
        # enforced, and every refresh warns until it is renewed.
        site_3.register()
        revoke(fed.tls, names=["site-3"], crl_days=0)  # next-update is now: expired when the server reads it
        server.wait_for_log(r"reloaded \(refresh\): 2 revoked, number 2", 30)
        expired = "revocation list expired on "
        wait_for(lambda: server.log().count(expired) >= 2, 30, "the expiry warning at load and at the next refresh")
        assert "renew it with `fl provision --out DIR`" in server.log()
        assert "certificate of 'site-3'" in _refused(site_3.register).details()
        assert site_1.heartbeat().known
        _refused(site_2.register)

        # Renewed with one more revocation, picked up by the interval too: it revokes the admin certificate.
        assert fed.fl("jobs").returncode == 0
        revoke(fed.tls, names=["admin"])
        server.wait_for_log(r"reloaded \(refresh\): 3 revoked, number 3", 30)
        _refused(site_3.register)
        jobs = fed.fl("jobs")
        assert jobs.returncode == 3 and "certificate of 'admin'" in jobs.stderr and "is revoked" in jobs.stderr
        assert site_1.heartbeat().known

    # A server does not start on a list its CA did not sign; it says which file and why.
    bad = subprocess.run(
        [sys.executable, "-m", "fl", "server", "--workspace", str(tmp_path / "ws2"), "--host", "127.0.0.1",
         "--port", "0", "--tls", str(fed.tls / "server"), "--crl", str(forged / "ca" / "crl.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert f"revocation list {forged / 'ca' / 'crl.pem'}: its signature does not verify" in bad.stderr


def test_an_allow_list_keeps_every_other_site_out(federation):
    fed = federation
    fed.start_server("--allowed-sites", "site-1,site-3")
    with Adversary(fed, "site-1") as allowed, Adversary(fed, "site-2") as other:
        allowed.register()
        refused = _refused(other.register)
        assert refused.details() == "site 'site-2' is not on this server's allowed sites (site-1, site-3)"
    assert fed.fl("jobs").returncode == 0, "admins are not sites: the allow-list does not apply to them"
