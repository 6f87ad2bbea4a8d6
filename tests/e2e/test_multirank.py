"""Multi-rank sites in pods: 2 gloo ranks of torch.distributed.run per site on CPU (issue 14, item 3).

One release, two sites with ``nprocPerNode: 2`` and no GPU: site-1 runs the job's script in its own pod
(the process launcher), site-2 in a job pod (the Kubernetes launcher, torchrun in the job pod, rank 0
talking to the site through the relay). The job is the integration suite's DDP script
(tests/integration/fixture_jobs/src/ddp_train.py, exported here with the Job API and submitted from the
server pod): rank r's loss is sum((w - r)^2), so with both ranks' gradients averaged a round maps w to
0.5 w + 0.25, and after 2 FedAvg rounds the global model is exactly 0.375 everywhere. Both sites' logs
must show both ranks.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path

import pytest

from tests.e2e.test_helm_hello_pt import TERMINAL, WORKSPACE, Release, release  # noqa: F401  (the fixture)
from tests.integration.test_multigpu import _ddp_job

pytestmark = pytest.mark.timeout(1800)
# Run in the server pod: unpack the exported job (a base64 zip on stdin) into argv[1]; print a checkpoint's weight.
UNPACK = (
    "import base64, io, sys, zipfile; "
    "zipfile.ZipFile(io.BytesIO(base64.b64decode(sys.stdin.read()))).extractall(sys.argv[1])"
)
FINAL_WEIGHT = (
    "import json, sys, torch; print(json.dumps(torch.load(sys.argv[1], weights_only=True)['model']['weight'].tolist()))"
)


def _zip(folder: Path) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return base64.b64encode(buffer.getvalue()).decode()


def test_two_gloo_ranks_per_site_in_a_site_pod_and_in_a_job_pod(
    release: Release,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    values = tmp_path / "ranks.yaml"
    values.write_text(
        json.dumps(
            {
                "siteDefaults": {"gpus": 0, "nprocPerNode": 2},
                "sites": [{"name": "site-1"}, {"name": "site-2", "launcher": "kubernetes"}],
                "job": {"submit": False},
            }
        )
    )
    started = time.monotonic()
    release.install(values=[values])
    job = _ddp_job(monkeypatch, {s: (None, "--evidence /tmp/ddp-evidence") for s in ("site-1", "site-2")}, rounds=2)
    folder = job.export_job(tmp_path / "export")
    unpack = release.c.kubectl_run(
        "exec", "-i", "-n", release.namespace, f"deploy/{release.name}-server", "--", "python", "-c", UNPACK,
        "/tmp/ddp-job", input=_zip(folder),
    )  # fmt: skip
    assert unpack.returncode == 0, unpack.stderr
    submitted = release.admin("submit", "/tmp/ddp-job", "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    status = release.wait_job(lambda j: j["job_id"] == job_id and j["status"] in TERMINAL, 1200, "the DDP job to end")
    assert status["status"] == "finished", status
    weight = release.server_exec("python", "-c", FINAL_WEIGHT, f"{WORKSPACE}/jobs/{job_id}/FL_global_model.pt")
    assert json.loads(weight.stdout) == [0.375] * 16, weight.stdout  # w -> 0.5 w + 0.25 twice: 2 ranks averaged
    for site in ("site-1", "site-2"):
        log = release.logs(release.site_pod(site))
        for rank in (0, 1):
            assert f"rank {rank} of 2 pid" in log and f"rank {rank}: done" in log, (site, log[-3000:])
        assert "--nproc_per_node=2" in log, (site, log[-3000:])
    assert "job pod" in release.logs(release.site_pod("site-2"))  # site-2's ranks ran in its job pod
    print(f"[e2e] two gloo ranks per site (site pod and job pod): {time.monotonic() - started:.0f} s")
