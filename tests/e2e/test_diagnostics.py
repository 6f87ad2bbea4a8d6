"""The e2e suite's failure dump (conftest.dump_artifacts) against stub kubectl and helm: it runs without a
cluster, so the diagnostics are known to work before a real failure needs them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.e2e.conftest import Cluster, dump_artifacts

PODS = {
    "items": [
        {"metadata": {"name": "fl-site-site-1-abc"},
         "status": {"containerStatuses": [{"name": "site", "restartCount": 2}]}},
        {"metadata": {"name": "fl-server-def"},
         "status": {"initContainerStatuses": [{"name": "init", "restartCount": 0}],
                    "containerStatuses": [{"name": "server", "restartCount": 0}]}},
    ]
}  # fmt: skip
WORKSPACE = {"jobs/j1/status.json": '{"status": "failed"}', "jobs/j1/logs/site-1.log": "site-1: round 1/2\n"}
MANIFEST = (
    "---\nkind: Secret\nmetadata: {name: fl-ca}\ndata: {ca.key: UFJJVkFURQ==}\n"
    "---\nkind: Service\nmetadata: {name: s}\n"
)

STUB = """#!{python}
import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if "--previous" in args:
    print("previous log of " + args[args.index("-c") + 1])
elif args[2:4] == ["get", "pods"] and "json" in args:
    print(json.dumps({pods}))
elif "exec" in args:
    print(json.dumps({workspace}))
elif "logs" in args:
    print("current log")
elif args[2:4] == ["get", "manifest"]:
    sys.stdout.write({manifest!r})
elif args[2:3] == ["status"]:
    print("STATUS: deployed")
else:
    print("output of " + " ".join(args[2:]))
"""


def stub_cluster(tmp_path: Path) -> tuple[Cluster, Path]:
    calls = tmp_path / "calls.jsonl"
    tool = tmp_path / "stub"
    tool.write_text(
        STUB.format(python=sys.executable, calls=str(calls), pods=PODS, workspace=WORKSPACE, manifest=MANIFEST)
    )
    tool.chmod(0o755)
    return Cluster(
        kubeconfig="kubeconfig", helm=str(tool), kubectl=str(tool), image_prefix="", artifacts=tmp_path
    ), calls


def test_a_failure_dump_saves_the_release_nodes_workspace_and_previous_logs_of_restarted_containers(
    tmp_path: Path,
) -> None:
    cluster, calls = stub_cluster(tmp_path)
    folder = tmp_path / "dump"
    dump_artifacts(cluster, "ns", folder, release="fl")
    assert not (folder / "dump-errors.txt").exists(), (folder / "dump-errors.txt").read_text()
    assert "STATUS: deployed" in (folder / "helm-status.txt").read_text()
    manifest = (folder / "helm-manifest.yaml").read_text()
    assert "UFJJVkFURQ" not in manifest and "<redacted>" in manifest and "kind: Service" in manifest
    assert "describe nodes" in (folder / "describe-nodes.txt").read_text()
    assert (folder / "fl-site-site-1-abc.site.previous.log").read_text().startswith("previous log of site")
    # Only restarted containers have previous logs (kubectl fails for the others).
    assert sorted(p.name for p in folder.glob("*.previous.log")) == ["fl-site-site-1-abc.site.previous.log"]
    assert (folder / "workspace" / "jobs" / "j1" / "status.json").read_text() == '{"status": "failed"}'
    assert (folder / "workspace" / "jobs" / "j1" / "logs" / "site-1.log").read_text().startswith("site-1: round")
    execs = [json.loads(line) for line in calls.read_text().splitlines() if '"exec"' in line]
    assert execs and execs[0][2:6] == ["exec", "-n", "ns", "deploy/fl-server"]


def test_a_dump_without_a_release_still_saves_the_pods_and_nodes(tmp_path: Path) -> None:
    cluster, _ = stub_cluster(tmp_path)
    folder = tmp_path / "dump"
    dump_artifacts(cluster, "ns", folder)
    assert not (folder / "helm-status.txt").exists() and not (folder / "workspace").exists()
    assert (folder / "describe-nodes.txt").exists() and (folder / "fl-server-def.log").exists()
