"""The Kubernetes launcher end to end against a fake pod API: real server, real sites, the relay, the shim.

The fake (tests/integration/fake_kube.py) runs each job pod as a local process, so the channel and
file relay between the site and its "pod" are tested for real; no cluster is needed.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fl.channel import ChannelClosed
from fl.client.state import SiteState
from fl.job import FedJob, ScriptRunner
from fl.site.kube_launch import LauncherConfig, build_pod, build_secret
from fl.site.kube_tls import dial
from fl.site.kube_wire import Wire, present_token
from fl.workflows.fedavg import FedAvg
from tests.integration.conftest import FIXTURES
from tests.integration.fake_kube import FakeKube
from tests.integration.federation import REPO, Federation, export_hello_pt, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[FakeKube]:
    fake = FakeKube(tmp_path, gpus=1)
    yield fake
    fake.close()


def _launcher(tmp_path: Path, kube: FakeKube, name: str, **settings: Any) -> tuple[str, ...]:
    config = {
        "image": "fl-site:test",
        "namespace": kube.namespace,
        "kubeconfig": str(kube.kubeconfig),
        "shimCommand": [sys.executable, "-m", "fl.site.kube_shim"],
        **settings,
    }
    path = tmp_path / f"launcher-{name}.json"
    path.write_text(json.dumps(config))
    return ("--launcher", "kubernetes", "--launcher-config", str(path))


def _one_site_job(out: Path) -> Path:
    """hello-pt for site-1 alone, 1 round, tiny synthetic data."""
    subprocess.run(
        [sys.executable, str(REPO / "jobs/hello-pt/job.py"), "--export-dir", str(out), "--dataset", "synthetic",
         "--train-size", "32", "--test-size", "32", "--n-clients", "1", "--num-rounds", "1"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out / "hello-pt"


def _submit(fed: Federation, job: Path) -> dict[str, Any]:
    proc = fed.fl("submit", str(job), "--wait", "--json", timeout=500)
    assert proc.stdout, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_hello_pt_trains_in_job_pods_that_are_deleted_after_the_job(federation, kube, tmp_path):
    fed = federation
    stale = build_pod(
        LauncherConfig(image="old"), name="fl-job-site-1-old", site="site-1", job_id="old", relay_address="x:1",
        secret="fl-job-site-1-old", owner=None,
    )  # fmt: skip
    kube.add_stale_pod(stale)
    orphan = build_secret(LauncherConfig(image="old"), name="fl-job-site-1-gone", site="site-1", job_id="gone",
                          token="t", sha256="0" * 64)  # fmt: skip
    kube.secrets["fl-job-site-1-gone"] = orphan  # its relay died before creating its pod
    fed.start_server()
    sites = [fed.start_site(n, extra=_launcher(tmp_path, kube, n, gpus=0)) for n in ("site-1", "site-2")]
    fed.wait_sites(["site-1", "site-2"])
    assert "fl-job-site-1-old" not in kube.pods, "a site that starts deletes the pods its earlier life left"
    assert "fl-job-site-1-gone" not in kube.secrets, "and the Secrets"

    info = _submit(fed, export_hello_pt(tmp_path / "export"))
    assert info["status"] == "finished", info
    created = {p["metadata"]["labels"]["fl/site"] for p in kube.created}
    assert created == {"site-1", "site-2"}
    wait_for(lambda: not kube.pods, 30, "the job pods to be deleted")
    assert not kube.secrets, "the job Secrets go with their pods"
    for pod in kube.created:  # the token is in the job's Secret, not in the pod's spec
        env = pod["spec"]["containers"][0]["env"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert refs == {
            "FL_RELAY_TOKEN": {"name": pod["metadata"]["name"], "key": "token"},
            "FL_RELAY_CERT_SHA256": {"name": pod["metadata"]["name"], "key": "cert-sha256"},
        }
        assert "TOKEN" not in json.dumps([e for e in env if "value" in e])
    logs = fed.fl("logs", info["job_id"], "--site", "site-1")
    assert "round 2 epoch 2/2" in logs.stdout, logs.stdout[-2000:]
    assert "job pod" in sites[0].log() and "connected" in sites[0].log()


def test_a_pod_whose_image_cannot_be_pulled_fails_the_job_with_the_reason(federation, kube, tmp_path):
    fed = federation
    fed.start_server()
    fed.start_site("site-1", extra=_launcher(tmp_path, kube, "site-1", image="missing/fl-site:nope"))
    fed.wait_sites(["site-1"])
    job = _one_site_job(tmp_path / "export")
    info = _submit(fed, job)
    assert info["status"] == "failed", info
    status = fed.job(info["job_id"])
    assert "ErrImagePull" in json.dumps(status), status
    wait_for(lambda: not kube.pods, 30, "the failed job pod to be deleted")


def test_a_pod_waiting_for_a_busy_gpu_fails_after_the_schedule_deadline_saying_why(federation, kube, tmp_path):
    fed = federation
    kube.gpus = 0  # the node's one GPU is taken
    fed.start_server()
    site = fed.start_site(
        "site-1", extra=_launcher(tmp_path, kube, "site-1", gpus=1, scheduleTimeoutSeconds=6, pendingLogSeconds=2)
    )
    fed.wait_sites(["site-1"])
    job = _one_site_job(tmp_path / "export")
    info = _submit(fed, job)
    assert info["status"] == "failed", info
    text = json.dumps(fed.job(info["job_id"]))
    assert "scheduleTimeoutSeconds" in text and "Insufficient nvidia.com/gpu" in text, text
    assert "still Pending" in site.log()
    assert kube.created[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    wait_for(lambda: not kube.pods, 30, "the pending job pod to be deleted")


def test_the_relay_refuses_a_plain_connection_and_a_wrong_token_and_says_so(federation, kube, tmp_path):
    fed = federation
    kube.gpus = 0  # keep the pod Pending: only our connection reaches the relay
    fed.start_server()
    site = fed.start_site("site-1", extra=_launcher(tmp_path, kube, "site-1", gpus=1, scheduleTimeoutSeconds=30))
    fed.wait_sites(["site-1"])
    job = _one_site_job(tmp_path / "export")
    proc = fed.fl("submit", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: kube.created, 60, "the job pod to be created")
    env = {e["name"]: e.get("value") for e in kube.created[0]["spec"]["containers"][0]["env"]}
    pinned = kube.secrets[kube.created[0]["metadata"]["name"]]["stringData"]["cert-sha256"]
    host, _, port = env["FL_RELAY_ADDRESS"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # no TLS: closed at the handshake
        sock.sendall(b'{"op":"_auth","token":"guessed"}\n')
        sock.settimeout(15)
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # closed, or reset with our bytes unread
            answer = b"".join(iter(lambda: sock.recv(1024), b""))
        assert b"op" not in answer, answer  # at most a TLS alert, never a line of the wire
    wait_for(lambda: "no TLS handshake" in site.log(), 30, "the relay to log the plain connection's refusal")
    wire = Wire(dial(env["FL_RELAY_ADDRESS"], pinned, timeout=10))  # the right relay, the wrong token
    present_token(wire, "guessed")
    assert wire.recv() == {
        "op": "_refused",
        "message": "the relay refused this pod: a wrong token (not this job's pod?)",
    }
    with pytest.raises(ChannelClosed):
        wire.recv()
    wire.close()
    wait_for(lambda: "a wrong token" in site.log(), 30, "the relay to log the refusal")
    kube.gpus = 1  # the right pod may now run and connect
    job_id = json.loads(proc.stdout)["job_id"]
    wait_for(lambda: fed.job(job_id).get("status") in ("finished", "failed"), 400, "the job to end")
    assert fed.job(job_id)["status"] == "finished", fed.job(job_id)


def _running_pod(kube: FakeKube) -> str:
    def running() -> str:
        with kube.lock:
            return next((name for name, pod in kube.pods.items() if pod.running()), "")

    name: str = wait_for(running, 120, "a running job pod")
    return name


def test_aborting_the_job_deletes_its_pod(federation, kube, tmp_path):
    fed = federation
    fed.start_server()
    fed.start_site("site-1", extra=_launcher(tmp_path, kube, "site-1"))
    fed.wait_sites(["site-1"])
    proc = fed.fl("submit", str(_one_site_job(tmp_path / "export")), "--json")
    assert proc.returncode == 0, proc.stderr
    _running_pod(kube)
    aborted = fed.fl("abort", json.loads(proc.stdout)["job_id"])
    assert aborted.returncode == 0, aborted.stderr
    wait_for(lambda: not kube.pods, 60, "the aborted job's pod to be deleted")


def test_a_site_killed_with_sigkill_leaves_no_running_pod(federation, kube, tmp_path):
    fed = federation
    fed.start_server()
    site = fed.start_site("site-1", extra=_launcher(tmp_path, kube, "site-1"))
    fed.wait_sites(["site-1"])
    proc = fed.fl("submit", str(_one_site_job(tmp_path / "export")), "--json")
    assert proc.returncode == 0, proc.stderr
    _running_pod(kube)
    site.kill9()  # no cleanup code runs in the site: the relay's parent-death signal (SIGTERM) does it
    wait_for(lambda: not kube.pods, 60, "the job pod of the killed site to be deleted")


def test_a_site_with_two_ranks_runs_them_under_torchrun_in_its_job_pod(federation, kube, tmp_path, monkeypatch):
    """--nproc-per-node 2 with the Kubernetes launcher: one job pod asking for the site's 2 GPUs runs the script as
    2 gloo ranks of torch.distributed.run; rank 0 alone talks to the site (through the pod's shim); DDP trains."""
    from tests.integration.conftest import run_dir
    from tests.integration.test_multigpu import _ddp_job, _evidence

    fed = federation
    kube.gpus = 2
    fed.start_server()
    site = fed.start_site("site-1", extra=(*_launcher(tmp_path, kube, "site-1", gpus=2), "--nproc-per-node", "2"))
    fed.wait_sites(["site-1"])
    evidence = tmp_path / "evidence"
    job = _ddp_job(monkeypatch, {"site-1": (None, f"--evidence {evidence}")}, rounds=1)
    info = _submit(fed, job.export_job(tmp_path / "export"))
    assert info["status"] == "finished", (info, site.log()[-4000:])
    (pod,) = kube.created
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    rank0, rank1 = _evidence(evidence, "site-1", 0), _evidence(evidence, "site-1", 1)
    assert [r["round"] for r in rank0] == [0] and [r["round"] for r in rank1] == [0], (rank0, rank1)
    assert rank0[0]["talks"] and not rank1[0]["talks"]
    assert rank0[0]["synced"] == rank1[0]["synced"] and rank0[0]["trained"] == rank1[0]["trained"]
    final = torch.load(run_dir(fed.root) / "FL_global_model.pt", weights_only=True)["model"]["weight"]
    assert torch.equal(final, torch.full((16,), 0.25))  # w -> 0.5 w + 0.25: both ranks' gradients averaged
    assert "--nproc_per_node=2" in site.log() and "rank 1 of 2" in site.log()
    wait_for(lambda: not kube.pods, 30, "the job pod to be deleted")


def _counting_job(monkeypatch: pytest.MonkeyPatch, rounds: int, script_args: str) -> FedJob:
    """plus_one.py for site-1 alone, one pod per task (launch_once=False), counting its rounds in flare.get_state()."""
    monkeypatch.chdir(FIXTURES)
    monkeypatch.syspath_prepend(str(FIXTURES))
    from src.models import FlatModel

    job = FedJob(name="state", min_clients=1)
    job.to(FedAvg(num_clients=1, num_rounds=rounds, round_timeout=300), "server")
    job.to(FlatModel(4), "server")
    job.to(ScriptRunner(script="src/plus_one.py", script_args=script_args, framework="numpy", launch_once=False),
           "site-1")  # fmt: skip
    return job


def test_the_state_store_travels_to_each_pod_and_back(federation, kube, tmp_path, monkeypatch):
    """Per-task runs in pods of their own: what a run left in flare.get_state() is what the next pod's run finds."""
    fed = federation
    fed.start_server()
    site = fed.start_site("site-1", extra=_launcher(tmp_path, kube, "site-1", gpus=0))
    fed.wait_sites(["site-1"])
    job = _counting_job(monkeypatch, 3, "--count-runs --state-bytes 4096")
    info = _submit(fed, job.export_job(tmp_path / "export"))
    assert info["status"] == "finished", (info, site.log()[-3000:])
    assert len(kube.created) == 3, "one pod per task"
    assert re.findall(r"state says round (\d) of this site", site.log()) == ["1", "2", "3"], site.log()[-3000:]
    state = SiteState(fed.root / "site-1" / info["job_id"] / "state")
    assert state["rounds"] == 3 and state["ballast"].nbytes == 4096  # the site holds the last pod's state


def test_a_state_over_the_limit_fails_the_run_saying_so(federation, kube, tmp_path, monkeypatch):
    fed = federation
    fed.start_server()
    fed.start_site("site-1", extra=_launcher(tmp_path, kube, "site-1", gpus=0, maxStateBytes=50_000))
    fed.wait_sites(["site-1"])
    info = _submit(fed, _counting_job(monkeypatch, 2, "--count-runs --state-bytes 100000").export_job(tmp_path / "x"))
    assert info["status"] == "failed", info
    logs = fed.fl("logs", info["job_id"], "--site", "site-1").stdout
    assert "exceeds the site's maxStateBytes (50000): not kept" in logs, logs[-3000:]
    assert "could not be kept" in logs
