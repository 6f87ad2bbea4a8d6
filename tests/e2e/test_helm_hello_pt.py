"""hello-pt on Kubernetes: `helm install fl charts/fl`, each site's training in `kubectl logs`, faults,
a certificate from another CA, and an upgrade that re-issues the server's certificate."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fl.provision import provision
from tests.e2e.conftest import REPO, Cluster, dump_artifacts, make_hostpath_volume

pytestmark = pytest.mark.timeout(1800)
TERMINAL = ("finished", "failed", "aborted")
WORKSPACE = "/var/lib/fl/workspace"
ADMIN_SECRET = "fl-admin-tls"  # the generated one for release "fl", and the one the existing-TLS test makes
# Run in the server pod: writes the admin's TLS files (JSON on stdin) to /tmp and runs `fl ARGS` as the admin.
ADMIN_EXEC = """
import base64, json, os, sys
folder = '/tmp/fl-admin-tls'
os.makedirs(folder, exist_ok=True)
for name, value in json.load(sys.stdin).items():
    with open(os.path.join(folder, name), 'wb') as f:
        f.write(base64.b64decode(value))
os.chmod(os.path.join(folder, 'tls.key'), 0o600)
os.execvp('fl', ['fl', *sys.argv[1:], '--server', '127.0.0.1:8002', '--tls', folder])
"""


class Release:
    """One install of the chart in a namespace of its own."""

    def __init__(self, cluster: Cluster, name: str = "fl") -> None:
        self.c = cluster
        self.name = name
        self.namespace = f"fl-e2e-{secrets.token_hex(3)}"
        self.installed = False

    def install(self, *sets: str, values: list[Path] = (), wait: bool = True, persistent: bool = False) -> float:
        args = ["install", self.name, str(REPO / "charts" / "fl"), "-n", self.namespace, "--create-namespace",
                "-f", str(REPO / "charts/fl/ci/cpu-values.yaml")]  # fmt: skip
        for path in values:
            args += ["-f", str(path)]
        server_repo, tag = self.c.image("fl-server")
        site_repo, _ = self.c.image("fl-site")
        settings = [
            f"image.server.repository={server_repo}", f"image.server.tag={tag}", "image.server.pullPolicy=IfNotPresent",
            f"image.site.repository={site_repo}", f"image.site.tag={tag}", "image.site.pullPolicy=IfNotPresent",
            "job.trainSize=256", "job.testSize=64",
        ]  # fmt: skip
        if persistent:
            settings.append("server.persistence.keep=false")
            if self.c.storage_class:
                volume = f"{self.namespace}-workspace"
                make_hostpath_volume(self.c, volume)
                settings.append(f"server.persistence.storageClass={self.c.storage_class}")
        else:
            settings.append("server.persistence.enabled=false")
        for item in [*settings, *sets]:
            args += ["--set", item]
        if wait:
            args += ["--wait", "--timeout", "15m"]
        started = time.monotonic()
        self.installed = True
        proc = self.c.helm_run(*args, check=False)
        assert proc.returncode == 0, f"helm install failed:\n{proc.stdout}\n{proc.stderr}"
        return time.monotonic() - started

    def upgrade(self, *sets: str) -> float:
        """helm upgrade with the values of the install plus `sets`, waiting for the pods."""
        args = ["upgrade", self.name, str(REPO / "charts" / "fl"), "-n", self.namespace, "--reuse-values",
                "--wait", "--timeout", "10m"]  # fmt: skip
        for item in sets:
            args += ["--set", item]
        started = time.monotonic()
        proc = self.c.helm_run(*args, check=False)
        assert proc.returncode == 0, f"helm upgrade failed:\n{proc.stdout}\n{proc.stderr}"
        return time.monotonic() - started

    def secret_data(self, name: str) -> dict[str, str]:
        secret = json.loads(self.c.kubectl_run("get", "secret", "-n", self.namespace, name, "-o", "json").stdout)
        return dict(secret["data"])

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`fl ARGS` as the admin, from inside the server pod (the admin's certificate from its Secret)."""
        tls = {k: v for k, v in self.secret_data(ADMIN_SECRET).items() if k in ("ca.crt", "tls.crt", "tls.key")}
        return self.c.kubectl_run(
            "exec", "-i", "-n", self.namespace, f"deploy/{self.name}-server", "--", "python", "-c", ADMIN_EXEC, *args,
            check=False, timeout=120, input=json.dumps(tls),
        )  # fmt: skip

    def registered_sites(self) -> list[dict[str, Any]]:
        """The sites the server has registered, as `fl sites --json` (the admin API) reports them."""
        proc = self.admin("sites", "--json")
        assert proc.returncode == 0, f"fl sites failed: {proc.stdout}\n{proc.stderr}"
        return list(json.loads(proc.stdout))

    def server_exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.c.kubectl_run(
            "exec", "-n", self.namespace, f"deploy/{self.name}-server", "--", *command, check=check, timeout=120
        )

    def jobs(self) -> list[dict[str, Any]]:
        """Every job's status.json, read in the server pod (empty while the server is away)."""
        script = (
            "import glob, json; print(json.dumps([json.load(open(p)) for p in "
            f"sorted(glob.glob('{WORKSPACE}/jobs/*/status.json'))]))"
        )
        proc = self.server_exec("python", "-c", script, check=False)
        if proc.returncode != 0:
            return []
        try:
            return list(json.loads(proc.stdout))
        except ValueError:
            return []

    def wait_job(self, condition: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = self.jobs()
            for job in last:
                if condition(job):
                    return job
            time.sleep(3)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; jobs: {last}")

    def pods(self, component: str, site: str | None = None) -> list[str]:
        selector = f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}"
        if site:
            selector += f",fl/site={site}"
        out = self.c.kubectl_run(
            "get", "pods", "-n", self.namespace, "-l", selector, "--field-selector=status.phase=Running", "-o", "name"
        ).stdout
        return out.split()

    def site_pod(self, site: str) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for pod in self.pods("site"):
                if f"-{site}-" in pod:
                    return pod
            time.sleep(2)
        raise AssertionError(f"no running pod for {site}")

    def logs(self, pod: str) -> str:
        return self.c.kubectl_run("logs", "-n", self.namespace, pod, check=False).stdout

    def uninstall(self) -> None:
        if self.installed:
            self.c.helm_run("uninstall", self.name, "-n", self.namespace, "--wait", "--timeout", "5m", check=False)
            self.installed = False

    def delete_namespace(self) -> None:
        self.c.kubectl_run("delete", "namespace", self.namespace, "--wait=false", check=False)


@pytest.fixture
def release(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Release]:
    rel = Release(cluster)
    yield rel
    close_release(rel, request, cluster.artifacts / request.node.name)


def close_release(rel: Release, request: pytest.FixtureRequest, folder: Path) -> None:
    """Uninstall and delete the namespace; first, if the set-up or test failed (or never reported), save
    what explains it to `folder` before the namespace goes."""
    reports = [getattr(request.node, f"rep_{when}", None) for when in ("setup", "call")]
    if any(r is None or r.failed for r in reports):
        dump_artifacts(rel.c, rel.namespace, folder, release=rel.name if rel.installed else None)
        print(f"\n[e2e] helm status, manifest, pod logs, descriptions, events and the workspace saved in {folder}")
    rel.uninstall()
    rel.delete_namespace()


def test_helm_install_runs_hello_pt_and_every_site_shows_its_training(release: Release) -> None:
    # The chart's job.wait default (false): helm install returns once the job is submitted.
    took = release.install(persistent=True)
    print(f"[e2e] helm install (pods ready, job submitted): {took:.0f} s")
    started = time.monotonic()
    job = release.wait_job(lambda j: j["status"] in TERMINAL, 900, "hello-pt to end")
    print(f"[e2e] job {job['status']} {time.monotonic() - started:.0f} s after the install returned")
    assert job["status"] == "finished", job["message"]
    assert job["sites"] == ["site-1", "site-2"] and job["num_rounds"] == 2

    for site in ("site-1", "site-2"):
        log = release.logs(release.site_pod(site))
        for line in (f"{site}: round 1/2", f"{site}: round 2/2", f"{site}: round 2 epoch 2/2",
                     "final validation: accuracy of the global model"):  # fmt: skip
            assert line in log, f"{site}'s log lacks {line!r}:\n{log[-3000:]}"
        assert f"[{site} job={job['job_id'][:8]} round=2/2]" in log

    files = release.server_exec("ls", f"{WORKSPACE}/jobs/{job['job_id']}").stdout.split()
    for name in ("FL_global_model.pt", "best_FL_global_model.pt", "validation.json", "tb_events", "logs"):
        assert name in files, files
    validation = json.loads(release.server_exec("cat", f"{WORKSPACE}/jobs/{job['job_id']}/validation.json").stdout)
    assert [m["model_version"] for m in validation["models"]] == [0, 1, 2]

    test = release.c.helm_run("test", release.name, "-n", release.namespace, "--timeout", "5m", check=False)
    assert test.returncode == 0, test.stdout + test.stderr

    release.uninstall()
    instance = f"app.kubernetes.io/instance={release.name}"
    kinds = "all,secrets,pvc,configmaps"
    deadline = time.monotonic() + 240  # pods of deleted objects take a while to go (1.20: ~2 min)
    while True:
        left = release.c.kubectl_run("get", kinds, "-n", release.namespace, "-l", instance, "-o", "name").stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not left, f"helm uninstall left {left}"


def test_server_pod_deleted_mid_job_the_job_resumes_and_finishes(release: Release) -> None:
    release.install("job.numRounds=4", "job.trainSize=1024", persistent=True)
    job = release.wait_job(lambda j: j["status"] == "running" and j["round"] >= 1, 900, "round 2 to start")
    release.c.kubectl_run(
        "delete", "pod", "-n", release.namespace, "-l",
        f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=server", "--wait=false",
    )  # fmt: skip
    deleted = time.monotonic()
    final = release.wait_job(lambda j: j["job_id"] == job["job_id"] and j["status"] in TERMINAL, 900, "the job to end")
    print(f"[e2e] job {final['status']} {time.monotonic() - deleted:.0f} s after the server pod was deleted")
    assert final["status"] == "finished", final["message"]
    server_log = release.logs(release.pods("server")[0])
    assert "resuming at round" in server_log, server_log[-3000:]


def test_site_pod_deleted_mid_job_rejoins(release: Release) -> None:
    release.install("job.numRounds=4", "job.trainSize=1024")
    job = release.wait_job(lambda j: j["status"] == "running" and j["round"] >= 1, 900, "round 2 to start")
    old = release.site_pod("site-2")
    release.c.kubectl_run("delete", "-n", release.namespace, old, "--wait=false")
    final = release.wait_job(lambda j: j["job_id"] == job["job_id"] and j["status"] in TERMINAL, 900, "the job to end")
    assert final["status"] == "finished", final["message"]
    new = next(p for p in release.pods("site") if "-site-2-" in p and p != old)
    log = release.logs(new)
    assert "starting job" in log and "round 4/4" in log, log[-3000:]


def test_a_site_with_a_certificate_from_another_ca_is_refused_by_the_server(release: Release, tmp_path: Path) -> None:
    """site-3 trusts the project's CA (so it can verify the server) but holds a certificate from another
    CA: the server's own client-certificate check must refuse it."""
    ns = release.namespace
    release.c.kubectl_run("create", "namespace", ns)
    good, other, foreign = tmp_path / "good", tmp_path / "other", tmp_path / "site-3"
    provision(good, server_name="server", server_dns=[f"fl-server.{ns}.svc.cluster.local", "fl-server"],
              sites=["site-1", "site-2"], admins=["admin@org"])  # fmt: skip
    provision(other, server_name="server", sites=["site-3"])
    foreign.mkdir()
    (foreign / "ca.crt").write_bytes((good / "site-1" / "ca.crt").read_bytes())
    for name in ("tls.crt", "tls.key"):
        (foreign / name).write_bytes((other / "site-3" / name).read_bytes())
    for secret, folder in (("fl-server-tls", good / "server"), (ADMIN_SECRET, good / "admin@org"),
                           ("fl-site-1-tls", good / "site-1"), ("fl-site-2-tls", good / "site-2"),
                           ("fl-site-3-tls", foreign)):  # fmt: skip
        release.c.kubectl_run("create", "secret", "generic", secret, "-n", ns, f"--from-file={folder}")
    values = tmp_path / "values.yaml"
    values.write_text(
        "tls: {mode: existing, existing: {server: fl-server-tls, admin: fl-admin-tls}}\n"
        "tests: {enabled: false}\n"
        "job: {nClients: 2}\n"
        "sites:\n"
        "  - {name: site-1, tlsSecret: fl-site-1-tls}\n"
        "  - {name: site-2, tlsSecret: fl-site-2-tls}\n"
        "  - {name: site-3, tlsSecret: fl-site-3-tls}\n"
    )
    release.install(values=[values], wait=False)
    job = release.wait_job(lambda j: j["status"] in TERMINAL, 900, "hello-pt to end on site-1 and site-2")
    assert job["status"] == "finished" and job["sites"] == ["site-1", "site-2"], job

    # The server's side: its TLS layer refused the handshake, and it never registered site-3.
    server_log = release.logs(release.pods("server")[0])
    assert "Handshake failed" in server_log, server_log[-3000:]
    assert "site site-1 registered" in server_log and "site site-2 registered" in server_log, server_log[-3000:]
    assert "site site-3 registered" not in server_log, server_log[-3000:]
    assert sorted(s["name"] for s in release.registered_sites()) == ["site-1", "site-2"]
    # site-3's side: it keeps trying and says it cannot register.
    log = release.logs(release.site_pod("site-3"))
    assert "cannot register" in log, log[-2000:]


def test_helm_upgrade_with_new_server_names_reissues_only_the_server_certificate_and_rolls_its_pod(
    release: Release,
) -> None:
    x509 = pytest.importorskip("cryptography.x509")
    release.install("job.submit=false")
    ca_before = release.secret_data("fl-ca")
    sites_before = {s: release.secret_data(f"fl-site-{s}-tls") for s in ("site-1", "site-2")}
    server_before = release.secret_data("fl-server-tls")
    (server_pod_before,) = release.pods("server")
    site_pods_before = sorted(release.pods("site"))

    took = release.upgrade("tls.generate.serverDnsNames[0]=fl.example.org")
    print(f"[e2e] helm upgrade with a new server name: {took:.0f} s")

    assert release.secret_data("fl-ca") == ca_before, "the upgrade must keep the CA"
    for site, data in sites_before.items():
        assert release.secret_data(f"fl-site-{site}-tls") == data, f"{site}'s certificate must be kept"
    server_after = release.secret_data("fl-server-tls")
    assert server_after["ca.crt"] == server_before["ca.crt"] and server_after["tls.crt"] != server_before["tls.crt"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(server_after["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "fl.example.org" in names, names

    # The server pod rolled (its checksum/tls changed); the sites' pods did not (theirs did not).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and release.pods("server") in ([], [server_pod_before]):
        time.sleep(3)
    (server_pod_after,) = release.pods("server")
    assert server_pod_after != server_pod_before
    assert sorted(release.pods("site")) == site_pods_before
    # ... and the federation carries on with the new certificate: both sites re-register, the admin's works.
    deadline = time.monotonic() + 300
    connected: list[str] = []
    while time.monotonic() < deadline:
        connected = sorted(s["name"] for s in release.registered_sites() if s["connected"])
        if connected == ["site-1", "site-2"]:
            break
        time.sleep(5)
    assert connected == ["site-1", "site-2"], connected
