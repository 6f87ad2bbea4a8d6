"""The chart's Kubernetes launcher: a light site pod, its job pods' config, RBAC only when some site uses it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.tools import find_tool
from tests.unit.test_chart import (
    CHART,
    OLDEST_SCHEMA,
    by_kind,
    container,
    render_values,
    run,
    site_deployments,
)

pytest.importorskip("yaml")
import yaml

Obj = dict[str, Any]
LAUNCHER_VALUES: Obj = {
    "networkPolicy": {"enabled": True},
    "siteDefaults": {"kubernetesLauncher": {"scheduleTimeoutSeconds": 900}},
    "sites": [
        {
            "name": "site-1",
            "launcher": "kubernetes",
            "gpus": 2,
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "data": {"mountPath": "/data", "volume": {"persistentVolumeClaim": {"claimName": "scans"}}},
            "kubernetesLauncher": {"pendingLogSeconds": 15},
        },
        {"name": "site-2"},
    ],
}


def _launcher_config(objs: list[Obj], site: str) -> Obj:
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith(f"site-{site}-launcher")]
    config: Obj = json.loads(cm["data"]["launcher.json"])
    return config


def test_rbac_is_rendered_only_when_some_site_uses_the_kubernetes_launcher(tmp_path: Path) -> None:
    plain = render_values(tmp_path, {})
    assert not by_kind(plain, "Role") and not by_kind(plain, "RoleBinding")
    assert not [o for o in by_kind(plain, "ConfigMap") if "launcher" in o["metadata"]["name"]]
    objs = render_values(tmp_path, LAUNCHER_VALUES)
    (role,) = by_kind(objs, "Role")
    (binding,) = by_kind(objs, "RoleBinding")
    rules = {tuple(r["resources"]): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        ("pods",): {"create", "get", "list", "watch", "delete"},
        ("pods/log",): {"get"},
        ("events",): {"list"},
        ("secrets",): {"create", "patch", "delete", "deletecollection"},  # never get/list: others' Secrets
    }
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["namespace"] == "fl-test"
    assert subject["name"] in {sa["metadata"]["name"] for sa in by_kind(objs, "ServiceAccount")}


def test_a_kubernetes_launcher_site_pod_is_light_and_its_job_pods_get_the_gpus(tmp_path: Path) -> None:
    objs = render_values(tmp_path, LAUNCHER_VALUES)
    sites = site_deployments(objs)
    spec = sites["site-1"]["spec"]["template"]["spec"]
    site = container(spec, "site")
    assert "nvidia.com/gpu" not in json.dumps(site["resources"])
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert spec["automountServiceAccountToken"] is True and spec["serviceAccountName"].endswith("-launcher")
    assert site["args"][site["args"].index("--launcher") + 1] == "kubernetes"
    # gpus: 2 means 2 ranks of torch.distributed.run per job, run in the job pod that holds the 2 GPUs
    assert site["args"][site["args"].index("--nproc-per-node") + 1] == "2"
    assert "/data" not in {m["mountPath"] for m in site["volumeMounts"]}
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in site["env"] if "valueFrom" in e}
    assert fields == {
        "FL_POD_NAME": "metadata.name",
        "FL_POD_UID": "metadata.uid",
        "FL_POD_NAMESPACE": "metadata.namespace",
        "FL_POD_IP": "status.podIP",
    }
    config = _launcher_config(objs, "1")
    assert config["gpus"] == 2 and config["nodeSelector"] == {"gpu": "a100"}
    assert config["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert config["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "scans"}}]
    assert config["volumeMounts"] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
    assert config["image"] == site["image"] and config["namespace"] == "fl-test"
    assert config["scheduleTimeoutSeconds"] == 900 and config["pendingLogSeconds"] == 15
    assert config["connectTimeoutSeconds"] == 300, "a partial kubernetesLauncher override keeps the other keys"
    assert config["labels"]["app.kubernetes.io/component"] == "job"
    # site-2 keeps the process launcher: its GPU on its own pod, no token
    other = sites["site-2"]["spec"]["template"]["spec"]
    assert other["automountServiceAccountToken"] is False
    assert container(other, "site")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_launcher_config_the_chart_writes_is_one_the_site_accepts(tmp_path: Path) -> None:
    from fl.site.kube_launch import LauncherConfig, build_pod

    config = LauncherConfig.from_dict(_launcher_config(render_values(tmp_path, LAUNCHER_VALUES), "1"))
    pod = build_pod(config, name="p", site="site-1", job_id="j", relay_address="1.2.3.4:5", secret="s", owner=None)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_job_pods_may_reach_only_their_site_pods_and_site_pods_accept_them(tmp_path: Path) -> None:
    objs = render_values(tmp_path, LAUNCHER_VALUES)
    policies = {p["metadata"]["name"]: p for p in by_kind(objs, "NetworkPolicy")}
    jobs = policies["fl-jobs"]["spec"]
    assert jobs["ingress"] == [] and jobs["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "job"
    (egress,) = jobs["egress"]
    assert egress["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "site"
    sites = policies["fl-sites"]["spec"]
    sources = [
        p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for r in sites["ingress"] for p in r["from"]
    ]
    assert "job" in sources


def test_launcher_renders_pass_lint_and_strict_schema_validation(tmp_path: Path) -> None:
    helm, validator = find_tool("helm"), find_tool("kubernetes-validate")
    values = tmp_path / "launcher.yaml"
    values.write_text(yaml.safe_dump(LAUNCHER_VALUES))
    run([helm, "lint", "--strict", str(CHART), "-f", str(values)])
    newest = re.search(r"Defaults to\s+(\d+\.\d+\.\d+)", run([validator, "--help"]).stdout)
    assert newest
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(run([helm, "template", "fl", str(CHART), "-n", "fl-test", "-f", str(values)]).stdout)
    proc = run(
        [validator, "--strict", "--quiet", "-k", OLDEST_SCHEMA, "-k", newest.group(1), str(manifest)], check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sites": [{"name": "site-1", "launcher": "pods"}]}, "launcher"),
        ({"siteDefaults": {"kubernetesLauncher": {"scheduleTimeoutSeconds": 0}}}, "scheduleTimeoutSeconds"),
    ],
)
def test_bad_launcher_values_fail_naming_the_value(tmp_path: Path, values: Obj, message: str) -> None:
    helm = find_tool("helm")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run([helm, "template", "fl", str(CHART), "-f", str(path)], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
