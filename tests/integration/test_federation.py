"""The production federation on loopback: provisioned mutual TLS, daemons, admin commands, faults."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fl.provision import provision
from tests.integration.federation import Federation, export_hello_pt, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, ["site-1", "site-2", "site-3"])
    yield fed
    fed.stop()


def _final_weight(fed: Federation, job_id: str, out: Path) -> torch.Tensor:
    proc = fed.fl("download", job_id, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return torch.load(out / "FL_global_model.pt", weights_only=True)["model"]["weight"]


def test_submit_hello_pt_to_a_tls_federation_and_download_the_results(federation, tmp_path):
    fed = federation
    fed.start_server()
    health = subprocess.run(
        [sys.executable, "-m", "fl", "health", "--server", fed.address, "--tls", str(fed.tls / "server")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    sites = [fed.start_site(name) for name in ("site-1", "site-2")]
    fed.wait_sites(["site-1", "site-2"])
    ready = subprocess.run(
        [sys.executable, "-m", "fl", "health", "--site-workspace", str(tmp_path / "site-1")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ready.returncode == 0, ready.stderr

    submitted = time.time()
    proc = fed.fl("submit", str(export_hello_pt(tmp_path / "export")), "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    assert info["status"] == "finished" and info["sites"] == ["site-1", "site-2"]
    print(f"submit to finished: {time.time() - submitted:.1f} s")

    jobs = fed.fl_json("jobs")
    assert [j["job_id"] for j in jobs] == [info["job_id"]]
    logs = fed.fl("logs", info["job_id"], "--site", "site-1")
    assert logs.returncode == 0 and "round 2 epoch 2/2" in logs.stdout
    files = fed.fl_json("download", info["job_id"], "-o", str(tmp_path / "results"))["files"]
    for name in ("FL_global_model.pt", "best_FL_global_model.pt", "validation.json", "logs/site-2.log"):
        assert name in files, name
    assert any(f.startswith("tb_events/site-1/") for f in files)
    # The server wrote every checkpoint without loading torch's libraries.
    assert fed.server is not None and fed.server.proc is not None
    maps = Path(f"/proc/{fed.server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps, "the server process loaded torch"
    # Each site's own log shows its training as it happened, with site, job and round in each line.
    site_log = sites[0].log()
    assert "[site-1 job=" in site_log and "round=2/2]" in site_log and "round 2 epoch 2/2" in site_log


def test_connections_without_the_right_certificate_are_refused(federation, tmp_path):
    fed = federation
    server = fed.start_server()
    # A site whose certificate another CA signed: the TLS handshake fails, and its log says so.
    provision(tmp_path / "other", server_name="server", sites=["site-1"])
    stranger = fed.start_site("site-1", tls=tmp_path / "other" / "site-1")
    stranger.wait_for_log(r"cannot register with .*UNAVAILABLE", 60)
    # A site certificate cannot run admin commands.
    proc = fed.fl("jobs", tls=fed.tls / "site-1")
    assert proc.returncode == 3 and "has role 'site'; admin commands need 'admin'" in proc.stderr
    # A site cannot register under another site's name.
    impostor = fed.start_site("site-2", tls=fed.tls / "site-1")
    impostor.wait_for_log(r"certificate is for 'site-1'; it cannot register as 'site-2'", 60)
    # No certificate at all: plaintext against a TLS server gets nowhere.
    plain = subprocess.run(
        [sys.executable, "-m", "fl", "jobs", "--server", fed.address, "--insecure"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert plain.returncode == 3, plain.stderr
    assert "site-1" not in {s["name"] for s in fed.fl_json("sites")}
    assert server.proc is not None and server.proc.poll() is None


def test_server_kill_9_mid_job_resumes_from_the_last_completed_round(federation, tmp_path, make_job):
    fed = federation
    server = fed.start_server()
    for name in ("site-1", "site-2"):
        fed.start_site(name)
    fed.wait_sites(["site-1", "site-2"])
    job = make_job(rounds=4, script_args={s: "--sleep 1" for s in ("site-1", "site-2")})
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    state = fed.root / "server" / "jobs" / job_id / "state.json"
    wait_for(lambda: state.exists() and json.loads(state.read_text())["next_round"] >= 2, 120, "round 2 to complete")
    server.kill9()
    restarted = time.monotonic()
    fed.start_server()
    final = wait_for(
        lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 180, "the resumed job to end"
    )
    assert final["status"] == "finished", final["message"]
    print(f"resumed job finished {time.monotonic() - restarted:.1f} s after the restart")
    # Every round applied exactly once: 4 rounds of +1.
    assert torch.equal(_final_weight(fed, job_id, tmp_path / "out"), torch.full((16,), 4.0))


def test_site_lost_mid_round_round_completes_when_min_clients_met(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    sites = {name: fed.start_site(name) for name in ("site-1", "site-2")}
    fed.wait_sites(list(sites))
    job = make_job(rounds=2, min_clients=1, script_args={"site-2": "--sleep 30"})
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    sites["site-2"].wait_for_log("task train received", 60)
    sites["site-2"].kill9()
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]
    assert torch.equal(_final_weight(fed, job_id, tmp_path / "out"), torch.full((16,), 2.0))


def test_site_lost_mid_round_fails_the_job_naming_it_when_min_clients_not_met(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    sites = {name: fed.start_site(name) for name in ("site-1", "site-2")}
    fed.wait_sites(list(sites))
    job = make_job(rounds=2, script_args={"site-2": "--sleep 30"})
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    sites["site-2"].wait_for_log("task train received", 60)
    sites["site-2"].kill9()
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "failed"
    assert "site-2: site lost" in final["message"], final["message"]


def test_killed_site_restarts_and_rejoins(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    sites = {name: fed.start_site(name) for name in ("site-1", "site-2")}
    fed.wait_sites(list(sites))
    job = make_job(rounds=3, script_args={s: "--sleep 2" for s in sites})
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    sites["site-2"].wait_for_log("task train received", 60)
    sites["site-2"].kill9()
    back = fed.start_site("site-2")
    back.wait_for_log("starting job", 60)
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 180, "the job to end")
    assert final["status"] == "finished", final["message"]
    assert torch.equal(_final_weight(fed, job_id, tmp_path / "out"), torch.full((16,), 3.0))
    assert "train result delivered" in back.log()


def test_transfers_cut_mid_stream_resume_and_the_job_finishes(federation, tmp_path, make_job):
    from tests.integration.federation import FlakyProxy

    fed = federation
    fed.start_server()
    proxy = FlakyProxy(fed.port)
    try:
        site = fed.start_site("site-1", address=f"127.0.0.1:{proxy.port}")
        fed.wait_sites(["site-1"])
        numel = 32 * 2**20 // 4  # 32 MiB of float32
        job = make_job(sites=1, rounds=2, numel=numel, framework="pytorch")
        job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
        site.wait_for_log("task train received", 120)
        proxy.arm(8 * 2**20)  # cut the connection 8 MiB into the upload of the result
        final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 300, "the job")
        assert final["status"] == "finished", final["message"]
        assert proxy.cuts == 1
        weight = _final_weight(fed, job_id, tmp_path / "out")
        assert weight.numel() == numel and bool((weight == 2.0).all())
        assert "upload interrupted" in site.log() and "resumed from byte" in site.log()
    finally:
        proxy.close()


def test_site_policy_refuses_jobs_with_custom_code(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    fed.start_site("site-1", extra=("--no-custom-code",))
    fed.wait_sites(["site-1"])
    job = make_job(sites=1, rounds=1)
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "failed"
    assert "refuses jobs that carry custom code" in final["message"], final["message"]


def test_a_job_waits_in_the_queue_until_its_sites_connect(federation, tmp_path, make_job):
    fed = federation
    fed.start_server()
    job = make_job(sites=2, rounds=1)
    job_id = json.loads(fed.fl("submit", str(job.export_job(tmp_path / "export")), "--json").stdout)["job_id"]
    wait_for(lambda: fed.job(job_id)["status"] == "waiting", 60, "the job to wait for its sites")
    fed.start_site("site-1")
    fed.start_site("site-2")
    final = wait_for(lambda: (j := fed.job(job_id))["status"] in ("finished", "failed") and j, 120, "the job to end")
    assert final["status"] == "finished", final["message"]
