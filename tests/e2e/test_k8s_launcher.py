"""The Kubernetes launcher on a real cluster: a site whose jobs train in pods of their own, holding the GPU
only while they train.

The node advertises an extended resource ``nvidia.com/gpu: 1`` (its status capacity patched through the
API, as Kubernetes' "advertise extended resources" task does; no real GPU is needed). hello-pt runs on
one site with ``launcher: kubernetes`` and ``gpus: 1``: its job pod appears while the job trains and is
gone after it; a second job submitted meanwhile needs the same GPU, so its pod waits Pending
(Unschedulable: Insufficient nvidia.com/gpu) until the first job's pod releases it, then finishes too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cluster, wait_until
from tests.e2e.test_helm_hello_pt import TERMINAL, Release, release  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(1800)
GPU = "nvidia.com/gpu"
GPU_PATH = "nvidia.com~1gpu"  # JSON pointer escaping of the '/'


@pytest.fixture
def one_gpu_node(cluster: Cluster) -> Iterator[str]:
    """The (single) node, advertising one nvidia.com/gpu for the test; the resource is removed after."""
    from kubernetes import client, config

    config.load_kube_config(config_file=cluster.kubeconfig)
    api = client.CoreV1Api()
    node = api.list_node().items[0].metadata.name
    patch = [{"op": "add", "path": f"/status/{part}/{GPU_PATH}", "value": "1"} for part in ("capacity", "allocatable")]
    api.patch_node_status(node, patch)  # PATCH /api/v1/nodes/NAME/status, application/json-patch+json
    deadline = time.monotonic() + 60
    while api.read_node(node).status.allocatable.get(GPU) != "1":
        assert time.monotonic() < deadline, f"node {node} does not advertise {GPU} after the patch"
        time.sleep(1)
    yield node
    remove = [{"op": "remove", "path": f"/status/{part}/{GPU_PATH}"} for part in ("capacity", "allocatable")]
    api.patch_node_status(node, remove)


def _job_pods(rel: Release) -> list[dict[str, Any]]:
    out = rel.c.kubectl_run(
        "get", "pods", "-n", rel.namespace, "-l", "app.kubernetes.io/component=job,fl/site=site-1", "-o", "json"
    ).stdout
    pods: list[dict[str, Any]] = json.loads(out)["items"]
    return pods


def _unschedulable(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("reason") == "Unschedulable" and f"Insufficient {GPU}" in c.get("message", "") for c in conditions)


def test_job_pods_hold_the_gpu_only_while_a_job_trains(release: Release, one_gpu_node: str, tmp_path: Path) -> None:  # noqa: F811
    values = tmp_path / "launcher.yaml"
    values.write_text(
        json.dumps(
            {
                "sites": [
                    {
                        "name": "site-1",
                        "launcher": "kubernetes",
                        "gpus": 1,
                        "kubernetesLauncher": {"pendingLogSeconds": 1},
                    }
                ],
                "server": {"extraArgs": ["--max-running-jobs", "2"]},
                # The first job holds the GPU long enough for the second's pod to be seen waiting for it
                # (a quiet machine ran 3 rounds of the default size in 8 s).
                "job": {"nClients": 1, "numRounds": 3, "trainSize": 2000, "testSize": 200},
            }
        )
    )
    started = time.monotonic()
    release.install(values=[values])
    site_pod = release.site_pod("site-1")
    site_spec = json.loads(release.c.kubectl_run("get", "-n", release.namespace, site_pod, "-o", "json").stdout)
    assert GPU not in json.dumps(site_spec["spec"]["containers"][0]["resources"]), "the site pod itself is light"

    first = wait_until(
        "the first job's pod to run",
        600,
        lambda: [p for p in _job_pods(release) if p["status"].get("phase") == "Running"],
    )[0]
    assert first["spec"]["containers"][0]["resources"]["limits"][GPU] == "1"
    assert first["metadata"]["ownerReferences"][0]["name"] == site_pod.split("/")[-1]

    # A second job for the same site while the first trains: its pod needs the GPU the first one holds.
    export = release.server_exec(
        "python", "/opt/fl/jobs/hello-pt/job.py", "--export-dir", "/tmp/second", "--dataset", "synthetic",
        "--n-clients", "1", "--num-rounds", "1", "--train-size", "64", "--test-size", "32",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    submitted = release.admin("submit", "/tmp/second/hello-pt", "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    second_id = json.loads(submitted.stdout)["job_id"]
    waiting = wait_until(
        "the second job's pod to wait for the GPU",
        300,
        lambda: [
            p for p in _job_pods(release) if p["metadata"]["name"] != first["metadata"]["name"] and _unschedulable(p)
        ],
    )[0]
    assert waiting["metadata"]["labels"]["fl/job"] == second_id[:63]
    wait_until("the site to say why the pod waits", 120, lambda: "still Pending" in release.logs(site_pod))

    release.wait_job(lambda j: j["job_id"] == second_id and j["status"] in TERMINAL, 1200, "the second job to end")
    jobs = wait_until(
        "both jobs to end", 120, lambda: (js := release.jobs()) and all(j["status"] in TERMINAL for j in js) and js
    )
    assert [j["status"] for j in jobs] == ["finished", "finished"], jobs
    wait_until("every job pod to be deleted", 120, lambda: not _job_pods(release))
    log = release.logs(site_pod)
    assert "site-1: round 3/3" in log and f"job pod {waiting['metadata']['name']} deleted" in log, log[-3000:]
    print(f"[e2e] kubernetes launcher test: {time.monotonic() - started:.0f} s")
