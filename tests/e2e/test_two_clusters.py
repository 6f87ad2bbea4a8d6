"""A federation across two Kubernetes clusters (issue 14): the coordinator provisions with
`fl provision --helm-values`; cluster A runs the server (NodePort on A's node) and site-1; cluster B, with
its own API server and network, runs only site-2, which dials A's node address; hello-pt finishes with
both sites. tests/e2e/run_local.sh starts B next to A (tests/e2e/local_cluster/README.md, "Two clusters")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import REPO, Cluster, wait_until
from tests.e2e.test_helm_hello_pt import TERMINAL, Release, close_release

pytestmark = pytest.mark.timeout(1800)
# The server's NodePort on A's node: fixed, because the provisioned site values name it before A installs.
NODE_PORT = 31802
ADMIN = "fl-admin"  # its Secret is fl-admin-tls, the one Release.admin uses
# Extra `--set`s for site-2's release in cluster B: site-2 runs its job scripts in pods of their own
# (the Kubernetes launcher); FL_E2E_SITE_2_SET adds more (space-separated) without an edit.
SITE_2_SETS: tuple[str, ...] = ("siteDefaults.launcher=kubernetes",)


def node_address(c: Cluster) -> str:
    """The InternalIP of the cluster's (first) node: what sites in other clusters dial."""
    nodes = json.loads(c.kubectl_run("get", "nodes", "-o", "json").stdout)["items"]
    addresses = nodes[0]["status"]["addresses"]
    return next(a["address"] for a in addresses if a["type"] == "InternalIP")


def provision_federation(out: Path, server_ip: str, server_namespace: str) -> Path:
    """`fl provision --helm-values` at the coordinator: the server certificate names A's node IP (what
    site-2 dials) and the in-cluster Service name (what site-1 dials). Returns the values folder."""
    helm_dir = out / "helm"
    proc = subprocess.run(
        [sys.executable, "-m", "fl", "provision", "--out", str(out),
         "--server-dns", server_ip, "--server-dns", f"fl-server.{server_namespace}.svc.cluster.local",
         "--sites", "site-1,site-2", "--admins", ADMIN,
         "--helm-values", str(helm_dir), "--helm-server-address", f"{server_ip}:{NODE_PORT}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, f"fl provision failed:\n{proc.stdout}\n{proc.stderr}"
    return helm_dir


def apply_secrets(rel: Release, helm_dir: Path, *participants: str) -> None:
    """The provisioned TLS Secret manifests of `participants`, in the release's namespace (made here)."""
    rel.c.kubectl_run("create", "namespace", rel.namespace)
    for name in participants:
        rel.c.kubectl_run("apply", "-n", rel.namespace, "-f", str(helm_dir / f"{name}-tls-secret.yaml"))


@pytest.fixture
def releases(cluster: Cluster, cluster_b: Cluster, request: pytest.FixtureRequest) -> Iterator[tuple[Release, Release]]:
    """One release in each cluster; on a failure both clusters' diagnostics are saved."""
    a, b = Release(cluster), Release(cluster_b)
    yield a, b
    for rel, which in ((b, "cluster-b"), (a, "cluster-a")):
        close_release(rel, request, cluster.artifacts / request.node.name / which)


def test_server_and_site_1_in_cluster_a_and_site_2_alone_in_cluster_b_finish_hello_pt(
    releases: tuple[Release, Release], tmp_path: Path
) -> None:
    a, b = releases
    server_ip = node_address(a.c)
    helm_dir = provision_federation(tmp_path / "prov", server_ip, a.namespace)
    site_2_values = yaml.safe_load((helm_dir / "site-2-values.yaml").read_text())
    assert site_2_values["externalServer"] == {"address": f"{server_ip}:{NODE_PORT}", "serverName": ""}

    # Cluster A: the coordinator's server values, exposed on A's node, plus site-1 and the submit hook.
    apply_secrets(a, helm_dir, "server", ADMIN, "site-1")
    cluster_a_values = tmp_path / "cluster-a-values.yaml"
    cluster_a_values.write_text(
        f"server: {{service: {{type: NodePort, nodePort: {NODE_PORT}}}}}\n"
        "sites: [{name: site-1, tlsSecret: site-1-tls}]\n"
        "job: {submit: true, nClients: 2}\n"
        "tests: {enabled: false}\n"
    )
    took = a.install(values=[helm_dir / "server-values.yaml", cluster_a_values])
    print(f"[e2e] cluster A: server + site-1 installed, job submitted in {took:.0f} s")

    # Cluster B: site-2 alone, from its provisioned values (sites only, dialing A's NodePort).
    apply_secrets(b, helm_dir, "site-2")
    site_2_sets = [*SITE_2_SETS, *os.environ.get("FL_E2E_SITE_2_SET", "").split()]
    took = b.install(*site_2_sets, values=[helm_dir / "site-2-values.yaml"])
    print(f"[e2e] cluster B: site-2 installed in {took:.0f} s")

    started = time.monotonic()
    job = a.wait_job(lambda j: j["status"] in TERMINAL, 900, "hello-pt to end on site-1 (A) and site-2 (B)")
    print(f"[e2e] job {job['status']} {time.monotonic() - started:.0f} s after cluster B's install returned")
    assert job["status"] == "finished", job["message"]
    assert job["sites"] == ["site-1", "site-2"] and job["num_rounds"] == 2, job

    for rel, site in ((b, "site-2"), (a, "site-1")):
        log = rel.logs(rel.site_pod(site))
        for line in (f"{site}: round 1/2", f"{site}: round 2/2", f"[{site} job={job['job_id'][:8]} round=2/2]"):
            assert line in log, f"{site}'s log (cluster {'B' if rel is b else 'A'}) lacks {line!r}:\n{log[-3000:]}"
    # site-2's script ran in a job pod of B's (the Kubernetes launcher), deleted when its run ended.
    # The relay deletes the pod once the script's run is over, which may be after the job's status reads
    # finished (the last result is in before the script exits).
    site_2 = b.site_pod("site-2")
    assert "job pod " in b.logs(site_2), f"site-2 ran no job pod:\n{b.logs(site_2)[-3000:]}"
    wait_until("site-2 to delete its job pod", 120, lambda: " deleted" in b.logs(site_2))
    wait_until("site-2's job pod to be gone", 180, lambda: b.pods("job") == [])
    # B runs no server, and A's server registered site-2 (from B's node address, through the NodePort).
    assert b.pods("server") == []
    assert sorted(s["name"] for s in a.registered_sites()) == ["site-1", "site-2"]
