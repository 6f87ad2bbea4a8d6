"""Static checks of the Helm chart charts/fl, without a cluster.

`helm lint --strict` and `helm template` for the defaults and every scenario in charts/fl/ci/,
`kubernetes-validate --strict` of every rendered object (Kubernetes 1.25 and the newest schemas it
ships), and assertions on the rendered objects against docs/operations.md: one pod per site, GPU
requests exactly where a site has GPUs, consistent labels and selectors, TLS mounted everywhere,
probes, the secure defaults, the server port and address, the submit hook and the chart test.

The tools come from `bash tools/install-tools.sh` (the cache folder it prints) or PATH; a test
that needs a missing tool is skipped with a reason saying so.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools import find_tool

yaml = pytest.importorskip(
    "yaml", reason="PyYAML is missing from this venv: pip install pyyaml (it renders nothing without it)"
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fl"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
CASES = ["(chart defaults)", *SCENARIOS]
RELEASE = "fl"
NAMESPACE = "fl-test"
TLS_DIR = "/etc/fl/tls"
WORKSPACE = "/var/lib/fl/workspace"
OLDEST_SCHEMA = "1.25.0"
# What Kubernetes 1.20 (the e2e cluster, the chart's kubeVersion floor) serves for the chart's objects.
ALLOWED_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "networking.k8s.io/v1", "policy/v1beta1"}

Obj = dict[str, Any]


# --- tools ---------------------------------------------------------------------------------------
def run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def values_args(case: str) -> list[str]:
    return [] if case not in SCENARIOS else ["-f", str(CHART / "ci" / case)]


@functools.cache
def _render(helm: str, case: str, extra: tuple[str, ...]) -> str:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(case), *extra]
    return run(cmd).stdout


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_manifests(text: str) -> list[Obj]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc]


def render(case: str, *extra: str) -> list[Obj]:
    return parse_manifests(_render(find_tool("helm"), case, tuple(extra)))


def render_values(tmp_path: Path, values: Obj, *extra: str) -> list[Obj]:
    """Render with a values file holding `values` (over the chart's defaults)."""
    path = tmp_path / f"values-{hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return render("(chart defaults)", "-f", str(path), *extra)


# --- effective values (Helm's merge: maps merge, everything else replaces) ------------------------
def deep_merge(base: Any, override: Any) -> Any:
    """Maps merge key by key at every depth, a key set to None is removed, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def effective_values(case: str) -> Obj:
    values: Obj = yaml.safe_load((CHART / "values.yaml").read_text())
    if case in SCENARIOS:
        values = deep_merge(values, yaml.safe_load((CHART / "ci" / case).read_text()) or {})
    return values


def has_server(case: str) -> bool:
    """Whether the case runs a server in the release (false: sites only, dialing externalServer.address)."""
    return bool(effective_values(case)["server"]["enabled"])


#: The cases whose release runs the server (all but the sites-only topology).
SERVER_CASES = [c for c in CASES if has_server(c)]


def effective_sites(values: Obj) -> list[Obj]:
    """Each site with siteDefaults filled in, as the chart does: maps merge, other keys a site sets win."""
    defaults = {**values["siteDefaults"], "image": values["image"]["site"]}
    return [deep_merge(defaults, site) for site in values["sites"]]


# --- object helpers ------------------------------------------------------------------------------
def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def component(obj: Obj) -> str | None:
    labels: dict[str, str] = obj["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component")


def pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj, Obj]]:
    """(description, pod metadata, pod spec) of every pod the render creates."""
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            yield (
                f"{o['kind']}/{o['metadata']['name']}",
                o["spec"]["template"]["metadata"],
                o["spec"]["template"]["spec"],
            )
        elif o["kind"] == "Pod":
            yield f"Pod/{o['metadata']['name']}", o["metadata"], o["spec"]


def all_containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def server_deployments(objs: list[Obj]) -> list[Obj]:
    """The server Deployment, as a list: [] in a sites-only release."""
    return [d for d in by_kind(objs, "Deployment") if component(d) == "server"]


def server_deployment(objs: list[Obj]) -> Obj:
    servers = [d for d in by_kind(objs, "Deployment") if component(d) == "server"]
    assert len(servers) == 1, f"expected one server Deployment, got {[d['metadata']['name'] for d in servers]}"
    return servers[0]


def site_deployments(objs: list[Obj]) -> dict[str, Obj]:
    """Site Deployments by the site name in their `--name` argument."""
    out: dict[str, Obj] = {}
    for d in by_kind(objs, "Deployment"):
        if component(d) != "site":
            continue
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        name = flag(args, "--name")
        assert name not in out, f"two Deployments run site {name}"
        out[name] = d
    return out


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return str(args[args.index(name) + 1])


def server_service(objs: list[Obj]) -> Obj:
    services = by_kind(objs, "Service")
    assert len(services) == 1, [s["metadata"]["name"] for s in services]
    return services[0]


def service_address(objs: list[Obj]) -> str:
    svc = server_service(objs)
    return f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def hook_job(objs: list[Obj]) -> Obj:
    jobs = by_kind(objs, "Job")
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0]


def container(spec: Obj, name: str) -> Obj:
    for c in all_containers(spec):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {[c['name'] for c in all_containers(spec)]}")


def gpu_quantities(resources: Obj) -> dict[str, Any]:
    """Every nvidia.com/* quantity in requests or limits, keyed 'requests:<name>' / 'limits:<name>'."""
    return {
        f"{part}:{key}": value
        for part in ("requests", "limits")
        for key, value in (resources.get(part) or {}).items()
        if key.startswith("nvidia.com/")
    }


# --- lint, render, schema validation --------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict_passes(case: str) -> None:
    helm = find_tool("helm")
    run([helm, "lint", "--strict", str(CHART), *values_args(case)])


@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_validate_strictly_against_kubernetes_schemas(case: str, tmp_path: Path) -> None:
    validator = find_tool("kubernetes-validate")
    newest = re.search(r"Defaults to\s+(\d+\.\d+\.\d+)", run([validator, "--help"]).stdout)
    assert newest, "cannot read kubernetes-validate's newest schema version from its --help"
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(_render(find_tool("helm"), case, ()))
    proc = run(
        [validator, "--strict", "--quiet", "-k", OLDEST_SCHEMA, "-k", newest.group(1), str(manifest)],
        check=False,
    )
    assert proc.returncode == 0, f"schema validation failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("case", CASES)
def test_only_api_groups_that_kubernetes_1_20_serves(case: str) -> None:
    versions = {o["apiVersion"] for o in render(case, "--kube-version", "1.20.2")}
    assert versions <= ALLOWED_API_VERSIONS, versions - ALLOWED_API_VERSIONS


def test_default_render_is_one_server_and_two_sites_with_one_gpu_each() -> None:
    objs = render("(chart defaults)")
    server_deployment(objs)
    sites = site_deployments(objs)
    assert sorted(sites) == ["site-1", "site-2"]
    for name, d in sites.items():
        resources = d["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1, name
        assert resources["limits"]["nvidia.com/gpu"] == 1, name


def test_cpu_scenario_requests_no_gpu_anywhere() -> None:
    objs = render("cpu-values.yaml")
    assert len(site_deployments(objs)) == 2
    for where, _, spec in pod_specs(objs):
        for c in all_containers(spec):
            assert not gpu_quantities(c.get("resources") or {}), f"{where}/{c['name']} asks for a GPU"


# --- sites ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_one_pod_template_per_site(case: str) -> None:
    objs = render(case)
    expected = [s["name"] for s in effective_values(case)["sites"]]
    sites = site_deployments(objs)
    assert sorted(sites) == sorted(expected)
    for name, d in sites.items():
        assert d["spec"]["replicas"] == 1, name
        assert d["spec"]["template"]["metadata"]["labels"]["fl/site"] == name


@pytest.mark.parametrize("case", CASES)
def test_gpu_requests_and_limits_exactly_when_a_site_has_gpus(case: str) -> None:
    objs = render(case)
    sites = site_deployments(objs)
    for site in effective_sites(effective_values(case)):
        c = sites[site["name"]]["spec"]["template"]["spec"]["containers"][0]
        gpus = gpu_quantities(c.get("resources") or {})
        if site["gpus"] > 0:
            resource = site["gpuResource"]
            assert gpus == {f"requests:{resource}": site["gpus"], f"limits:{resource}": site["gpus"]}, site["name"]
            assert not any(e["name"] == "NVIDIA_VISIBLE_DEVICES" for e in c.get("env", [])), site["name"]
        else:
            assert gpus == {}, f"{site['name']} has gpus=0 but asks for {gpus}"
            assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in c["env"], site["name"]
    # Nothing else in the release asks for a GPU.
    for where, meta, spec in pod_specs(objs):
        if meta["labels"].get("app.kubernetes.io/component") != "site":
            for c in all_containers(spec):
                assert not gpu_quantities(c.get("resources") or {}), f"{where}/{c['name']}"


@pytest.mark.parametrize("case", CASES)
def test_each_site_dials_the_server_service_dns_name(case: str) -> None:
    objs = render(case)
    external = effective_values(case)["externalServer"]
    address = service_address(objs) if has_server(case) else external["address"]
    for name, d in site_deployments(objs).items():
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] == "site"
        assert flag(args, "--server") == address, name
        if has_server(case) or not external["serverName"]:
            assert "--server-name" not in args, name
        else:
            assert flag(args, "--server-name") == external["serverName"], name
        assert flag(args, "--tls") == TLS_DIR
        assert flag(args, "--workspace") == WORKSPACE


def test_per_site_overrides_reach_their_own_pod_only() -> None:
    objs = render("gpu-values.yaml")
    sites = site_deployments(objs)
    one = sites["site-1"]["spec"]["template"]["spec"]
    two = sites["site-2"]["spec"]["template"]["spec"]
    assert one["containers"][0]["resources"]["requests"]["cpu"] == "4"
    assert two["containers"][0]["resources"]["requests"]["cpu"] == "1"
    data = [m for m in one["containers"][0]["volumeMounts"] if m["name"] == "data"]
    assert data == [{"name": "data", "mountPath": "/data", "readOnly": True}]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "site-1-cifar10"}} in one["volumes"]
    assert {"name": "data", "emptyDir": {"sizeLimit": "2Gi"}} in two["volumes"]
    assert {"name": "data", "mountPath": "/data", "readOnly": False} in two["containers"][0]["volumeMounts"]
    # env merges by name: the site's own value replaces the default, once.
    env_two = [e for e in two["containers"][0]["env"] if e["name"] == "FL_LOG_LEVEL"]
    assert env_two == [{"name": "FL_LOG_LEVEL", "value": "debug"}]
    env_one = [e for e in one["containers"][0]["env"] if e["name"] == "FL_LOG_LEVEL"]
    assert env_one == [{"name": "FL_LOG_LEVEL", "value": "info"}]
    for spec in (one, two):
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_a_site_can_turn_its_gpus_off_against_the_default() -> None:
    objs = render("(chart defaults)", "--set", "sites[0].name=a,sites[0].gpus=0,sites[1].name=b")
    sites = site_deployments(objs)
    assert gpu_quantities(sites["a"]["spec"]["template"]["spec"]["containers"][0]["resources"]) == {}
    assert gpu_quantities(sites["b"]["spec"]["template"]["spec"]["containers"][0]["resources"]) == {
        "requests:nvidia.com/gpu": 1,
        "limits:nvidia.com/gpu": 1,
    }


def test_sites_run_one_rank_per_gpu_when_gpus_exceed_one_and_a_cpu_site_can_ask_for_two_ranks() -> None:
    """nprocPerNode (fl site --nproc-per-node): 0, the default, is one rank per GPU for gpus > 1, else none."""
    objs = render(
        "(chart defaults)",
        "--set",
        "sites[0].name=two-gpus,sites[0].gpus=2,sites[1].name=cpu,sites[1].gpus=0,sites[1].nprocPerNode=2,"
        "sites[2].name=one-gpu,sites[3].name=pinned,sites[3].gpus=4,sites[3].nprocPerNode=1",
    )

    def ranks(deployment: Obj) -> str | None:
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return args[args.index("--nproc-per-node") + 1] if "--nproc-per-node" in args else None

    assert {name: ranks(d) for name, d in site_deployments(objs).items()} == {
        "two-gpus": "2",
        "cpu": "2",
        "one-gpu": None,
        "pinned": None,
    }
    cpu = site_deployments(objs)["cpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu_quantities(cpu["resources"]) == {}  # 2 gloo ranks on a CPU site request no GPU
    defaults = render("(chart defaults)", "--set", "siteDefaults.nprocPerNode=3")
    assert {ranks(d) for d in site_deployments(defaults).values()} == {"3"}


# --- labels, selectors ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_labels_and_selectors_are_consistent(case: str) -> None:
    objs = render(case)
    deployments = by_kind(objs, "Deployment")
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), d["metadata"]["name"]
        assert selector["app.kubernetes.io/instance"] == RELEASE
        assert selector["app.kubernetes.io/name"] == "fl"
        assert selector["app.kubernetes.io/component"] in ("server", "site")
        assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector, (
            "selectors must not change on upgrade"
        )
        # No Deployment's selector also matches another Deployment's pods.
        for other in deployments:
            if other is not d:
                assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, o["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]
    if not has_server(case):
        assert by_kind(objs, "Service") == [], "a sites-only release has no server Service"
        return
    svc_selector = server_service(objs)["spec"]["selector"]
    matching = [where for where, meta, _ in pod_specs(objs) if svc_selector.items() <= meta["labels"].items()]
    assert matching == [f"Deployment/{server_deployment(objs)['metadata']['name']}"]


# --- TLS -----------------------------------------------------------------------------------------
def tls_secret_of(spec: Obj) -> str:
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes["tls"]["secret"]
    assert {i["key"] for i in secret["items"]} == {"ca.crt", "tls.crt", "tls.key"}
    assert {i["path"] for i in secret["items"]} == {"ca.crt", "tls.crt", "tls.key"}
    assert secret["defaultMode"] == 0o440
    return str(secret["secretName"])


@pytest.mark.parametrize("case", CASES)
def test_tls_secrets_are_mounted_into_every_pod(case: str) -> None:
    objs = render(case)
    values = effective_values(case)
    secrets = {s["metadata"]["name"]: s for s in by_kind(objs, "Secret")}
    generated = values["tls"]["mode"] == "generate"
    expected: dict[str, str] = {}
    if has_server(case):
        server = server_deployment(objs)
        expected[f"Deployment/{server['metadata']['name']}"] = (
            "fl-server-tls" if generated else values["tls"]["existing"]["server"]
        )
    for site in values["sites"]:
        name = site_deployments(objs)[site["name"]]["metadata"]["name"]
        expected[f"Deployment/{name}"] = f"fl-site-{site['name']}-tls" if generated else site["tlsSecret"]
    admin = "fl-admin-tls" if generated else values["tls"]["existing"]["admin"]
    for where, _, spec in pod_specs(objs):
        secret = tls_secret_of(spec)
        assert secret == expected.get(where, admin), where
        for c in all_containers(spec):
            if c["name"] == "export":  # only job.py --export-dir; it talks to nobody
                continue
            mounts = [m for m in c["volumeMounts"] if m["name"] == "tls"]
            assert mounts == [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}], f"{where}/{c['name']}"
        if generated:
            assert secret in secrets, f"{where} mounts {secret}, which the chart does not make"
            assert secrets[secret]["type"] == "kubernetes.io/tls"
            assert set(secrets[secret]["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    if not generated:
        assert secrets == {}, "existing TLS mode must not create Secrets"


def test_generated_certificates_carry_the_contract_subjects() -> None:
    x509 = pytest.importorskip("cryptography.x509", reason="cryptography (a project dependency) is missing")
    import base64
    import ipaddress

    from cryptography.x509.oid import NameOID

    objs = render("(chart defaults)")
    secrets = {s["metadata"]["name"]: s["data"] for s in by_kind(objs, "Secret")}

    def cert(name: str, key: str = "tls.crt") -> Any:
        return x509.load_pem_x509_certificate(base64.b64decode(secrets[name][key]))

    ca = cert("fl-ca", "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    svc = server_service(objs)["metadata"]["name"]
    for secret, cn, role in [
        ("fl-server-tls", "server", "server"),
        ("fl-admin-tls", "admin@org", "admin"),
        ("fl-site-site-1-tls", "site-1", "site"),
        ("fl-site-site-2-tls", "site-2", "site"),
    ]:
        c = cert(secret)
        assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        c.verify_directly_issued_by(ca)
        assert base64.b64decode(secrets[secret]["ca.crt"]) == base64.b64decode(secrets["fl-ca"]["ca.crt"])
        sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"{role}.role.fl.invalid" in sans.get_values_for_type(x509.DNSName), secret
        if role == "server":
            dns = set(sans.get_values_for_type(x509.DNSName))
            assert {
                svc,
                f"{svc}.{NAMESPACE}",
                f"{svc}.{NAMESPACE}.svc",
                f"{svc}.{NAMESPACE}.svc.cluster.local",
                "localhost",
            } <= dns
            assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)


def _server_crl(objs: list[Obj]) -> tuple[list[str], dict[str, Any], list[Obj]]:
    """The server's arguments, its `crl` volume (or {}) and the container's `crl` mounts."""
    spec = server_deployment(objs)["spec"]["template"]["spec"]
    server = container(spec, "server")
    volume = next((v for v in spec["volumes"] if v["name"] == "crl"), {})
    return server["args"], volume, [m for m in server["volumeMounts"] if m["name"] == "crl"]


def test_revocation_list_is_a_secret_mounted_into_the_server_and_named_by_crl(tmp_path: Path) -> None:
    import base64

    from fl.provision import provision, revoke

    args, volume, mounts = _server_crl(render("(chart defaults)"))
    assert "--crl" not in args and volume == {} and mounts == []
    assert "fl-crl" not in {s["metadata"]["name"] for s in by_kind(render("(chart defaults)"), "Secret")}

    provision(tmp_path, sites=["site-1", "site-2"])
    revoke(tmp_path, names=["site-2"])
    crl = tmp_path / "ca" / "crl.pem"
    objs = render("(chart defaults)", "--set-file", f"tls.crl.pem={crl}")
    secret = {s["metadata"]["name"]: s for s in by_kind(objs, "Secret")}["fl-crl"]
    assert base64.b64decode(secret["data"]["crl.pem"]) == crl.read_bytes()
    args, volume, mounts = _server_crl(objs)
    assert volume["secret"]["secretName"] == "fl-crl"
    assert volume["secret"]["items"] == [{"key": "crl.pem", "path": "crl.pem"}]
    assert mounts == [{"name": "crl", "mountPath": "/etc/fl/crl", "readOnly": True}]  # no subPath: updates reach it
    assert flag(args, "--crl") == "/etc/fl/crl/crl.pem" and flag(args, "--crl-refresh") == "60"

    objs = render("existing-tls-values.yaml", "--set", "tls.crl.existingSecret=ops-crl,tls.crl.refreshSeconds=5")
    args, volume, _ = _server_crl(objs)
    assert volume["secret"]["secretName"] == "ops-crl" and flag(args, "--crl-refresh") == "5"
    assert by_kind(objs, "Secret") == [], "an existing revocation Secret is not made by the chart"


def test_the_revoke_flow_works_with_the_chart_generated_ca(tmp_path: Path) -> None:
    """README's flow for tls.mode generate: the chart's (RSA) CA signs a list the server accepts."""
    import base64

    from fl.provision import revoke
    from fl.server.admission import parse_revocation_list
    from fl.transport import parse_certificate

    secrets = {s["metadata"]["name"]: s["data"] for s in by_kind(render("(chart defaults)"), "Secret")}
    (tmp_path / "ca").mkdir()
    for key in ("ca.crt", "ca.key"):
        (tmp_path / "ca" / key).write_bytes(base64.b64decode(secrets["fl-ca"][key]))
    site_cert = tmp_path / "site-2.crt"
    site_cert.write_bytes(base64.b64decode(secrets["fl-site-site-2-tls"]["tls.crt"]))
    assert [r.name for r in revoke(tmp_path, cert_files=[site_cert])] == ["site-2"]
    crl = parse_revocation_list((tmp_path / "ca" / "crl.pem").read_bytes(), (tmp_path / "ca" / "ca.crt").read_bytes())
    assert crl.revokes(parse_certificate(site_cert.read_bytes()))
    other = base64.b64decode(secrets["fl-site-site-1-tls"]["tls.crt"])
    assert not crl.revokes(parse_certificate(other))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("tls.crl.pem=x,tls.crl.existingSecret=y", "tls.crl: give either pem or existingSecret, not both"),
        ("tls.crl.existingSecret=y,tls.crl.refreshSeconds=0", "refreshSeconds"),
    ],
)
def test_bad_revocation_list_values_fail(values: str, message: str) -> None:
    helm = find_tool("helm")
    proc = run([helm, "template", RELEASE, str(CHART), "--set", values], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- probes, security ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_probes_run_fl_health_as_the_contract_says(case: str) -> None:
    objs = render(case)
    port = effective_values(case)["server"]["port"]
    servers = [server_deployment(objs)] if has_server(case) else []
    for server in (d["spec"]["template"]["spec"]["containers"][0] for d in servers):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["exec"]["command"] == [
                "fl",
                "health",
                "--server",
                f"127.0.0.1:{port}",
                "--tls",
                TLS_DIR,
            ], probe
    for name, d in site_deployments(objs).items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = c[probe]["exec"]["command"]
            assert command[:4] == ["fl", "health", "--site-workspace", WORKSPACE], (name, probe)
            assert command[4] == "--max-age" and int(command[5]) > 0, (name, probe)


@pytest.mark.parametrize("case", CASES)
def test_every_pod_runs_with_the_secure_defaults(case: str) -> None:
    for where, _, spec in pod_specs(render(case)):
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001, where
        assert psc["fsGroup"] == 10001, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}, where
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc["runAsNonRoot"] is True, (where, c["name"])
            assert "privileged" not in sc or sc["privileged"] is False
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/tmp") == "tmp", f"{where}/{c['name']} has no writable /tmp"
            assert {"name": "HOME", "value": "/tmp"} in c["env"], f"{where}/{c['name']}"
    # The workspaces are writable volumes, not the read-only root.
    objs = render(case)
    servers = [server_deployment(objs)] if has_server(case) else []
    for d in [*servers, *site_deployments(objs).values()]:
        spec = d["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts[WORKSPACE] == "workspace"
        assert "workspace" in {v["name"] for v in spec["volumes"]}


def test_service_account_token_is_not_mounted() -> None:
    objs = render("(chart defaults)")
    (sa,) = by_kind(objs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for where, _, spec in pod_specs(objs):
        assert spec["serviceAccountName"] == sa["metadata"]["name"], where


# --- server --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "extra"), [(c, ()) for c in SERVER_CASES] + [("(chart defaults)", ("--set", "server.port=9443"))]
)
def test_service_port_matches_the_server_port_flag(case: str, extra: tuple[str, ...]) -> None:
    objs = render(case, *extra)
    c = server_deployment(objs)["spec"]["template"]["spec"]["containers"][0]
    port = int(flag(c["args"], "--port"))
    assert c["args"][0] == "server"
    assert flag(c["args"], "--tls") == TLS_DIR and flag(c["args"], "--workspace") == WORKSPACE
    assert c["ports"] == [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
    (svc_port,) = server_service(objs)["spec"]["ports"]
    assert svc_port["port"] == port and svc_port["targetPort"] == "grpc"
    if extra:
        assert port == 9443
        assert service_address(objs).endswith(":9443")


@pytest.mark.parametrize("case", SERVER_CASES)
def test_server_workspace_is_a_pvc_or_an_emptydir(case: str) -> None:
    objs = render(case)
    persistence = effective_values(case)["server"]["persistence"]
    volumes = {v["name"]: v for v in server_deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    if persistence["enabled"]:
        (pvc,) = pvcs
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    else:
        assert pvcs == []
        assert "emptyDir" in volumes["workspace"]


def test_daemons_take_only_arguments_for_the_images_tini_fl_entrypoint() -> None:
    objs = render("(chart defaults)")
    for d in [server_deployment(objs), *site_deployments(objs).values()]:
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert "command" not in c, d["metadata"]["name"]
        assert c["args"][0] in ("server", "site")


def test_extra_args_come_after_the_contract_flags() -> None:
    objs = render("five-sites-values.yaml")
    server_args = server_deployment(objs)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert server_args[-2:] == ["--site-wait-timeout", "1800"]
    sites = site_deployments(objs)
    args = {name: d["spec"]["template"]["spec"]["containers"][0]["args"] for name, d in sites.items()}
    assert args["site-5"][-2:] == ["--log-level", "DEBUG"]
    assert "--log-level" not in args["site-4"]


def test_server_no_custom_code_renders_the_servers_flag() -> None:
    def server_args(*extra: str) -> list[str]:
        spec = server_deployment(render("(chart defaults)", *extra))["spec"]["template"]["spec"]
        args: list[str] = spec["containers"][0]["args"]
        return args

    assert "--no-custom-code" not in server_args()
    assert "--no-custom-code" in server_args("--set", "server.noCustomCode=true")


def test_server_strategy_never_runs_two_servers() -> None:
    assert server_deployment(render("(chart defaults)"))["spec"]["strategy"] == {"type": "Recreate"}


# --- the submit hook and the chart test ----------------------------------------------------------
@pytest.mark.parametrize("case", SERVER_CASES)
def test_submit_hook_exports_and_submits_the_configured_job(case: str) -> None:
    objs = render(case)
    values = effective_values(case)
    job_values = values["job"]
    job = hook_job(objs)
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["initContainers"]] == ["wait-for-server", "export"]
    address = service_address(objs)
    assert f"fl health --server {address} --tls {TLS_DIR}" in container(spec, "wait-for-server")["command"][2]

    export = container(spec, "export")
    assert re.match(r"fl-server[:@]", export["image"]), export["image"]
    assert export["command"] == ["python", "/opt/fl/jobs/hello-pt/job.py"]
    assert export["workingDir"] == "/opt/fl/jobs/hello-pt"
    args = export["args"]
    assert flag(args, "--export-dir") == "/tmp/fl-export"
    assert flag(args, "--n-clients") == str(job_values["nClients"] or len(values["sites"]))
    assert flag(args, "--num-rounds") == str(job_values["numRounds"])
    assert flag(args, "--dataset") == job_values["dataset"]
    if job_values["dataRoot"]:
        assert flag(args, "--data-root") == job_values["dataRoot"]
    else:
        assert "--data-root" not in args
    for key, option in (("trainSize", "--train-size"), ("testSize", "--test-size")):
        if job_values[key]:
            assert flag(args, option) == str(job_values[key])
        else:
            assert option not in args

    submit = container(spec, "submit")
    assert submit["command"] == ["fl"]
    wait = ["--wait", "--timeout", str(job_values["timeoutSeconds"])] if job_values["wait"] else []
    assert submit["args"] == ["submit", "/tmp/fl-export/hello-pt", "--server", address, "--tls", TLS_DIR, *wait]
    assert job["spec"]["activeDeadlineSeconds"] > job_values["timeoutSeconds"]
    # The export reaches the submit container through the shared /tmp emptyDir.
    for c in (export, submit):
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_submit_hook_options_and_switches() -> None:
    objs = render(
        "(chart defaults)",
        "--set",
        "job.wait=true,job.timeoutSeconds=120,job.onUpgrade=true,job.nClients=1,job.extraArgs[0]=--seed,job.extraArgs[1]=7",
    )
    job = hook_job(objs)
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    spec = job["spec"]["template"]["spec"]
    assert container(spec, "submit")["args"][-3:] == ["--wait", "--timeout", "120"]
    args = container(spec, "export")["args"]
    assert flag(args, "--n-clients") == "1"
    assert args[-2:] == ["--seed", "7"]
    assert by_kind(render("(chart defaults)", "--set", "job.submit=false"), "Job") == []


def test_chart_test_pod_checks_health_and_lists_jobs_as_the_admin() -> None:
    objs = render("(chart defaults)")
    (pod,) = by_kind(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    address = service_address(objs)
    assert container(pod["spec"], "health")["command"] == [
        "fl",
        "health",
        "--server",
        address,
        "--tls",
        TLS_DIR,
    ]
    assert container(pod["spec"], "jobs")["command"] == ["fl", "jobs", "--server", address, "--tls", TLS_DIR]
    assert tls_secret_of(pod["spec"]) == "fl-admin-tls"
    assert by_kind(render("(chart defaults)", "--set", "tests.enabled=false"), "Pod") == []


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("tls.mode=bogus", "tls.mode: bogus is not allowed; allowed values: generate, existing"),
        ("logFormat=xml", "logFormat: xml is not allowed; allowed values: text, json"),
        (
            "job.dataset=imagenet",
            "job.dataset: imagenet is not allowed; allowed values: auto, cifar10, synthetic",
        ),
        ("server.service.type=ExternalName", "allowed values: ClusterIP, NodePort, LoadBalancer"),
        ("sites[0].name=a,sites[0].color=red", "sites[0].color: unknown key; allowed keys: name, gpus"),
        ("sites[0].name=a,sites[1].name=a", 'sites[1].name: "a" is listed twice'),
        ("sites[0].name=a,sites[0].gpus=-1", "sites[0].gpus: -1 must be a whole number >= 0"),
        ("sites[0].name=a,sites[0].nprocPerNode=-2", "sites[0].nprocPerNode: -2 must be a whole number >= 0"),
        (
            "tls.mode=existing,tls.existing.server=s,tls.existing.admin=a",
            "tlsSecret: name the site's TLS Secret",
        ),
        ("sites[0].name=Site_1", 'sites[0].name: "Site_1" must be lower-case letters, digits and'),
        ("server.enabled=false", "externalServer.address: required when server.enabled is false"),
        (
            "server.enabled=false,externalServer.address=fl.example.org:8002",
            'tls.mode: "generate" cannot work with server.enabled: false; set tls.mode: existing',
        ),
        (
            "server.enabled=false,externalServer.address=fl.example.org,tls.mode=existing",
            'externalServer.address: "fl.example.org" is not host:port',
        ),
        ("externalServer.address=fl.example.org:8002", "set server.enabled: false for a sites-only release"),
        ("server.ingress.enabled=true", "server.externalNames: name at least one (the Ingress host"),
        ("sites=null", "job.submit: true with sites: [] and job.nClients: 0"),
    ],
)
def test_bad_values_fail_with_the_allowed_values(values: str, message: str) -> None:
    helm = find_tool("helm")
    for schema in ([], ["--skip-schema-validation"]):
        proc = run([helm, "template", RELEASE, str(CHART), "--set", values, *schema], check=False)
        assert proc.returncode != 0, f"--set {values} {schema} rendered"
        if schema:  # the template's own check, with the allowed values
            assert message in proc.stderr, proc.stderr


def test_schema_rejects_unknown_top_level_keys() -> None:
    helm = find_tool("helm")
    proc = run([helm, "template", RELEASE, str(CHART), "--set", "sever.port=1"], check=False)
    assert proc.returncode != 0 and "sever" in proc.stderr, proc.stderr


def test_kind_cluster_has_one_control_plane_and_two_workers() -> None:
    cluster = yaml.safe_load((REPO / "kind-cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [n["role"] for n in cluster["nodes"]] == ["control-plane", "worker", "worker"]


# --- per-site settings merge key by key -----------------------------------------------------------
def site_spec(objs: list[Obj], site: str) -> Obj:
    spec: Obj = site_deployments(objs)[site]["spec"]["template"]["spec"]
    return spec


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def probe_max_ages(spec: Obj) -> dict[str, int]:
    c = spec["containers"][0]
    return {
        p: int(flag(c[p]["exec"]["command"], "--max-age")) for p in ("startupProbe", "readinessProbe", "livenessProbe")
    }


# (map, siteDefaults' value, one site's partial override, what the site's pod must then show)
PARTIAL_OVERRIDES: list[tuple[str, Any, Any, Any]] = [
    (
        "probes",
        {"readyMaxAgeSeconds": 60, "liveMaxAgeSeconds": 600, "startupFailureThreshold": 120, "timeoutSeconds": 40,
         "livenessFailureThreshold": 6},
        {"readyMaxAgeSeconds": 30},
        lambda spec: (
            probe_max_ages(spec) == {"startupProbe": 30, "readinessProbe": 30, "livenessProbe": 600}
            and spec["containers"][0]["startupProbe"]["failureThreshold"] == 120
            and spec["containers"][0]["livenessProbe"]["failureThreshold"] == 6
            and {spec["containers"][0][p]["timeoutSeconds"] for p in PROBES} == {40}
        ),
    ),
    (
        "probes",
        {"readyMaxAgeSeconds": 60, "liveMaxAgeSeconds": 600, "startupFailureThreshold": 120, "timeoutSeconds": 40},
        {"timeoutSeconds": 90},
        lambda spec: (
            probe_max_ages(spec) == {"startupProbe": 60, "readinessProbe": 60, "livenessProbe": 600}
            and {spec["containers"][0][p]["timeoutSeconds"] for p in PROBES} == {90}
        ),
    ),
    (
        "resources",
        {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "16Gi"}},
        {"limits": {"memory": "8Gi"}},
        lambda spec: (
            spec["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "4Gi", "nvidia.com/gpu": 1}
            and spec["containers"][0]["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": 1}
        ),
    ),
    (
        "nodeSelector",
        {"pool": "gpu", "zone": "a"},
        {"zone": "b", "pool": None},
        lambda spec: spec["nodeSelector"] == {"zone": "b"},
    ),
    (
        "podAnnotations",
        {"team": "ml", "cost": "x"},
        {"cost": "z"},
        lambda spec: True,  # checked on the pod metadata below
    ),
    (
        "podLabels",
        {"team": "ml", "cost": "x"},
        {"cost": "z"},
        lambda spec: True,  # checked on the pod metadata below
    ),
    (
        "affinity",
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}},
        {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        lambda spec: set(spec["affinity"]) == {"nodeAffinity", "podAntiAffinity"},
    ),
    (
        "data",
        {"mountPath": "/data", "volume": {"persistentVolumeClaim": {"claimName": "shared"}}},
        {"readOnly": False},
        lambda spec: (
            {"name": "data", "mountPath": "/data", "readOnly": False} in spec["containers"][0]["volumeMounts"]
            and {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}} in spec["volumes"]
        ),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "default", "override", "check"), PARTIAL_OVERRIDES, ids=[o[0] for o in PARTIAL_OVERRIDES]
)
def test_a_partial_per_site_override_of_a_map_keeps_the_other_keys(
    tmp_path: Path, key: str, default: Any, override: Any, check: Any
) -> None:
    values = {"siteDefaults": {key: default}, "sites": [{"name": "site-1", key: override}, {"name": "site-2"}]}
    objs = render_values(tmp_path, values)
    one, two = (site_deployments(objs)[s]["spec"]["template"] for s in ("site-1", "site-2"))
    assert check(one["spec"]), (key, one["spec"])
    if key == "podAnnotations":
        annotations = one["metadata"]["annotations"]
        assert annotations["team"] == "ml" and annotations["cost"] == "z", annotations
        assert two["metadata"]["annotations"]["cost"] == "x"
    if key == "podLabels":
        labels = one["metadata"]["labels"]
        assert labels["team"] == "ml" and labels["cost"] == "z", labels
        assert two["metadata"]["labels"]["cost"] == "x"
    # The other site keeps the defaults untouched (the merge copies, never edits siteDefaults).
    rendered_default = render_values(tmp_path, {"siteDefaults": {key: default}})
    assert two["spec"] == site_deployments(rendered_default)["site-2"]["spec"]["template"]["spec"]


def test_a_site_image_override_of_the_tag_keeps_the_repository_and_pull_policy() -> None:
    objs = render(
        "(chart defaults)", "--set", "image.site.repository=r.io/fl-site,sites[0].name=a,sites[0].image.tag=t1"
    )
    c = site_spec(objs, "a")["containers"][0]
    assert c["image"] == "r.io/fl-site:t1" and c["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("case", CASES)
def test_exec_probes_outlast_a_loaded_node(case: str) -> None:
    """Exec probes start a Python process: at load 40+ one took over 10 s and the pods restarted mid-job. Each probe
    waits 30 s; a liveness restart takes 5 failures in a row (2.5 minutes of them) on the server and the sites."""
    objs = render(case)
    pods = [d["spec"]["template"]["spec"] for d in (server_deployments(objs) + list(site_deployments(objs).values()))]
    assert pods
    for spec in pods:
        c = spec["containers"][0]
        assert {c[p]["timeoutSeconds"] for p in PROBES} == {30}, c["name"]
        live = c["livenessProbe"]
        assert live["failureThreshold"] >= 5 and live["periodSeconds"] * live["failureThreshold"] >= 150, live


def test_the_chart_version_moved_and_its_app_version_is_fls() -> None:
    import fl

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == fl.__version__
    assert chart["version"] != "0.1.0", "the chart changed since 0.1.0 (its version is to move with it)"


def test_a_probe_value_below_one_fails_naming_the_site() -> None:
    helm = find_tool("helm")
    proc = run(
        [helm, "template", RELEASE, str(CHART), "--skip-schema-validation",
         "--set", "sites[0].name=a,sites[0].probes.liveMaxAgeSeconds=0"],
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "sites[0].probes.liveMaxAgeSeconds: 0 must be a whole number >= 1 (site a)" in proc.stderr, proc.stderr


def test_extra_volumes_merge_by_name_and_mounts_by_path(tmp_path: Path) -> None:
    values = {
        "siteDefaults": {
            "extraVolumes": [{"name": "certs", "configMap": {"name": "ca"}}, {"name": "cache", "emptyDir": {}}],
            "extraVolumeMounts": [{"name": "certs", "mountPath": "/certs"}, {"name": "cache", "mountPath": "/cache"}],
        },
        "sites": [
            {
                "name": "site-1",
                "extraVolumes": [{"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}}],
                "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache", "readOnly": True}],
            }
        ],
    }
    spec = site_spec(render_values(tmp_path, values), "site-1")
    assert [v for v in spec["volumes"] if v["name"] in ("certs", "cache")] == [
        {"name": "certs", "configMap": {"name": "ca"}},
        {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts = spec["containers"][0]["volumeMounts"]
    assert [m for m in mounts if m["mountPath"] in ("/certs", "/cache")] == [
        {"name": "certs", "mountPath": "/certs"},
        {"name": "cache", "mountPath": "/cache", "readOnly": True},
    ]


def test_a_data_volume_spec_with_a_name_renders_one_name(tmp_path: Path) -> None:
    volume = {"name": "mine", "persistentVolumeClaim": {"claimName": "x"}}
    values = {"sites": [{"name": "site-1", "data": {"mountPath": "/data", "volume": volume}}]}
    # parse_manifests refuses duplicate keys, which PyYAML and Kubernetes would silently resolve.
    spec = site_spec(render_values(tmp_path, values), "site-1")
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "x"}} in spec["volumes"]


# --- pod scheduling and extras ---------------------------------------------------------------------
def test_pod_labels_priority_spread_and_extra_volumes_reach_the_server_and_sites(tmp_path: Path) -> None:
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "site"}}}]  # fmt: skip
    extras = {
        "podLabels": {"team": "ml"},
        "priorityClassName": "fl-high",
        "topologySpreadConstraints": spread,
        "extraVolumes": [{"name": "extra", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
    }
    objs = render_values(tmp_path, {"server": extras, "siteDefaults": extras})
    for d in [server_deployment(objs), *site_deployments(objs).values()]:
        template = d["spec"]["template"]
        spec = template["spec"]
        assert template["metadata"]["labels"]["team"] == "ml", d["metadata"]["name"]
        assert d["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert spec["priorityClassName"] == "fl-high"
        assert spec["topologySpreadConstraints"] == spread
        assert {"name": "extra", "emptyDir": {}} in spec["volumes"]
        assert {"name": "extra", "mountPath": "/extra"} in spec["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("where", ["server.podLabels", "siteDefaults.podLabels", "sites[0].podLabels"])
def test_pod_labels_may_not_replace_the_charts_own(where: str) -> None:
    helm = find_tool("helm")
    sets = f"{where}.app\\.kubernetes\\.io/component=x"
    if where.startswith("sites"):
        sets = f"sites[0].name=a,{sets}"
    proc = run([helm, "template", RELEASE, str(CHART), "--set", sets], check=False)
    assert proc.returncode != 0
    assert '"app.kubernetes.io/component" is a label the chart sets itself' in proc.stderr, proc.stderr


DIGEST = "sha256:" + "ab" * 32


def test_image_digests_pin_the_server_and_site_images() -> None:
    objs = render("(chart defaults)", "--set", f"image.server.digest={DIGEST},image.site.digest={DIGEST}")
    for where, _, spec in pod_specs(objs):
        for c in all_containers(spec):
            assert c["image"].endswith(f"@{DIGEST}") and ":0.1.0" not in c["image"], (where, c["image"])


def test_a_malformed_image_digest_fails_clearly() -> None:
    helm = find_tool("helm")
    for schema in ([], ["--skip-schema-validation"]):
        proc = run([helm, "template", RELEASE, str(CHART), "--set", "image.site.digest=latest", *schema], check=False)
        assert proc.returncode != 0, schema
        if schema:
            assert 'image.site.digest: "latest" is not an image digest' in proc.stderr, proc.stderr


# --- server PodDisruptionBudget --------------------------------------------------------------------
@pytest.mark.parametrize(("kube", "api"), [("1.20.2", "policy/v1beta1"), ("1.21.0", "policy/v1"), ("", "policy/v1")])
def test_server_pod_disruption_budget_uses_the_api_the_cluster_serves(kube: str, api: str) -> None:
    extra = ["--set", "server.podDisruptionBudget.enabled=true"] + (["--kube-version", kube] if kube else [])
    objs = render("(chart defaults)", *extra)
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == api
    assert pdb["spec"]["minAvailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    matching = [where for where, meta, _ in pod_specs(objs) if selector.items() <= meta["labels"].items()]
    assert matching == [f"Deployment/{server_deployment(objs)['metadata']['name']}"]
    assert by_kind(render("(chart defaults)"), "PodDisruptionBudget") == []


# --- NetworkPolicy -------------------------------------------------------------------------------
def selects(selector: Obj, labels: dict[str, str]) -> bool:
    return bool(selector["matchLabels"].items() <= labels.items())


def test_network_policies_confine_sites_to_the_server_and_dns() -> None:
    objs = render("(chart defaults)", "--set", "networkPolicy.enabled=true")
    policies = {p["metadata"]["name"]: p for p in by_kind(objs, "NetworkPolicy")}
    assert sorted(policies) == ["fl-server", "fl-sites"]
    port = int(effective_values("(chart defaults)")["server"]["port"])
    pods = {where: meta["labels"] for where, meta, _ in pod_specs(objs)}
    server_pod = f"Deployment/{server_deployment(objs)['metadata']['name']}"
    site_pods = {f"Deployment/{d['metadata']['name']}" for d in site_deployments(objs).values()}

    sites = policies["fl-sites"]["spec"]
    assert {w for w, labels in pods.items() if selects(sites["podSelector"], labels)} == site_pods
    assert sites["policyTypes"] == ["Ingress", "Egress"] and sites["ingress"] == []
    to_server, dns = sites["egress"]
    assert [w for w, labels in pods.items() if selects(to_server["to"][0]["podSelector"], labels)] == [server_pod]
    assert to_server["ports"] == [{"protocol": "TCP", "port": port}]
    assert "to" not in dns and {p["port"] for p in dns["ports"]} == {53}

    server = policies["fl-server"]["spec"]
    assert [w for w, labels in pods.items() if selects(server["podSelector"], labels)] == [server_pod]
    assert server["policyTypes"] == ["Ingress"]
    (ingress,) = server["ingress"]
    allowed = {w for w, labels in pods.items() if any(selects(f["podSelector"], labels) for f in ingress["from"])}
    # The sites, the submit hook and the chart test: every pod of the release but the server itself.
    assert allowed == set(pods) - {server_pod}
    assert ingress["ports"] == [{"protocol": "TCP", "port": port}]
    assert by_kind(render("(chart defaults)"), "NetworkPolicy") == []


def test_network_policy_extra_rules_and_dns_peers_are_added(tmp_path: Path) -> None:
    dns_peer = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    extra_in = {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8002}]}
    extra_out = {"to": [{"ipBlock": {"cidr": "192.168.0.10/32"}}], "ports": [{"port": 443}]}
    objs = render_values(
        tmp_path,
        {"networkPolicy": {"enabled": True, "dns": {"to": [dns_peer]}, "server": {"extraIngress": [extra_in]},
                           "site": {"extraEgress": [extra_out]}}},
    )  # fmt: skip
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "NetworkPolicy")}
    assert policies["fl-sites"]["egress"][1]["to"] == [dns_peer]
    assert policies["fl-sites"]["egress"][2] == extra_out
    assert policies["fl-server"]["ingress"][1] == extra_in


# --- TLS checksums, GitOps -----------------------------------------------------------------------
def secret_checksum(secret: Obj) -> str:
    """What the chart's checksum/tls is: sha256 of the Secret's data as Helm's toJson writes it."""
    return hashlib.sha256(json.dumps(secret["data"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_each_pod_carries_the_checksum_of_the_tls_secret_it_mounts() -> None:
    objs = render("(chart defaults)")
    secrets = {s["metadata"]["name"]: s for s in by_kind(objs, "Secret")}
    checksums = set()
    for d in [server_deployment(objs), *site_deployments(objs).values()]:
        template = d["spec"]["template"]
        secret = secrets[tls_secret_of(template["spec"])]
        assert template["metadata"]["annotations"]["checksum/tls"] == secret_checksum(secret), d["metadata"]["name"]
        checksums.add(secret_checksum(secret))
    assert len(checksums) == 3, "the server and each site have a certificate of their own"


def test_checksum_keeps_the_pod_annotations_given() -> None:
    objs = render("(chart defaults)", "--set", "server.podAnnotations.team=ml")
    annotations = server_deployment(objs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["team"] == "ml" and len(annotations["checksum/tls"]) == 64


def test_existing_tls_the_gitops_path_renders_identically_every_time() -> None:
    """Generated TLS is new on every render without `lookup` (helm template, Argo CD); existing is not."""
    helm = find_tool("helm")
    existing = CHART / "ci" / "existing-tls-values.yaml"
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    assert run([*cmd, "-f", str(existing)]).stdout == run([*cmd, "-f", str(existing)]).stdout
    for d in [
        server_deployment(render("existing-tls-values.yaml")),
        *site_deployments(render("existing-tls-values.yaml")).values(),
    ]:
        assert "checksum/tls" not in (d["spec"]["template"]["metadata"].get("annotations") or {})
    assert run(cmd).stdout != run(cmd).stdout, "generated TLS is expected to differ between renders"
    readme = (CHART / "README.md").read_text()
    assert "GitOps" in readme and "tls.mode: existing" in readme


# --- NOTES ---------------------------------------------------------------------------------------
def render_notes(tmp_path: Path, *extra: str) -> str:
    """NOTES.txt as `helm install` prints it: helm template skips NOTES, so a copy of the chart renders
    it into a ConfigMap."""
    chart = tmp_path / "fl"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "fl.test.notes" -}}\n' + notes + "\n{{- end }}\n")
    configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n"
    (chart / "templates" / "notes.yaml").write_text(configmap + '  notes: {{ include "fl.test.notes" . | toJson }}\n')
    text = run([find_tool("helm"), "template", RELEASE, str(chart), "-s", "templates/notes.yaml", *extra]).stdout
    return str(parse_manifests(text)[0]["data"]["notes"])


def test_install_does_not_wait_for_the_job_by_default_and_notes_say_how_to_follow(tmp_path: Path) -> None:
    submit = container(hook_job(render("(chart defaults)"))["spec"]["template"]["spec"], "submit")
    assert "--wait" not in submit["args"]
    notes = render_notes(tmp_path)
    assert "fl logs JOB_ID --follow" in notes and "fl status JOB_ID" in notes
    assert "--timeout longer than the training" not in notes
    waiting = render_notes(tmp_path / "w", "--set", "job.wait=true")
    assert "--timeout longer than the training" in waiting


# --- topologies: all-in-one, server only, sites only ----------------------------------------------
def test_sites_only_release_runs_sites_and_nothing_of_the_server() -> None:
    objs = render("sites-only-values.yaml")
    values = effective_values("sites-only-values.yaml")
    assert server_deployments(objs) == []
    for kind in ("Service", "PersistentVolumeClaim", "Job", "Pod", "Secret", "Ingress", "PodDisruptionBudget"):
        assert by_kind(objs, kind) == [], f"a sites-only release renders no {kind}"
    sites = site_deployments(objs)
    assert sorted(sites) == [s["name"] for s in values["sites"]]
    for site in values["sites"]:
        assert tls_secret_of(sites[site["name"]]["spec"]["template"]["spec"]) == site["tlsSecret"]
    (policy,) = by_kind(objs, "NetworkPolicy")
    server_rule = policy["spec"]["egress"][0]
    assert server_rule == {"ports": [{"protocol": "TCP", "port": 443}]}, "egress to the external server's port"


def test_sites_only_notes_name_the_external_server_and_no_admin_secret(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, "-f", str(CHART / "ci" / "sites-only-values.yaml"))
    assert "no server (a sites-only release)" in notes and "fl.example.org:443" in notes
    assert "kubectl get secret" not in notes


def test_server_only_release_exposes_the_server_to_sites_outside_the_cluster() -> None:
    objs = render("server-only-values.yaml")
    assert site_deployments(objs) == {}
    server_deployment(objs)
    svc = server_service(objs)
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["loadBalancerIP"] == "203.0.113.10"
    assert svc["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
    (ingress,) = by_kind(objs, "Ingress")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "fl.example.org"
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": svc["metadata"]["name"], "port": {"name": "grpc"}}
    assert flag(container(hook_job(objs)["spec"]["template"]["spec"], "export")["args"], "--n-clients") == "2"


def test_node_port_service_takes_the_given_port_and_no_ingress_by_default() -> None:
    objs = render("(chart defaults)", "--set", "server.service.type=NodePort,server.service.nodePort=30802")
    (port,) = server_service(objs)["spec"]["ports"]
    assert port["nodePort"] == 30802
    assert "loadBalancerIP" not in server_service(objs)["spec"]
    assert by_kind(objs, "Ingress") == []


def test_external_names_are_in_the_generated_server_certificate() -> None:
    x509 = pytest.importorskip("cryptography.x509", reason="cryptography (a project dependency) is missing")
    import base64

    objs = render("server-only-values.yaml")
    (secret,) = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == "fl-server-tls"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)


# --- metrics -------------------------------------------------------------------------------------
# Not a charts/fl/ci scenario: the older tests there pin the server's ports to the gRPC one.
METRICS_ON = (
    "--set",
    "metrics.enabled=true,metrics.port=9102,metrics.serviceMonitor.enabled=true,"
    "metrics.serviceMonitor.labels.release=prometheus,networkPolicy.enabled=true",
)
MONITOR_APIS = (
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
)


def render_metrics(*extra: str) -> list[Obj]:
    return render("(chart defaults)", *METRICS_ON, *extra)


def daemon_pods(objs: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(pod metadata, daemon container) of the server and every site."""
    deployments = [server_deployment(objs), *site_deployments(objs).values()]
    return [(d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"]["containers"][0]) for d in deployments]


def test_metrics_are_off_by_default_no_port_flag_annotation_or_monitor() -> None:
    objs = render("(chart defaults)", *MONITOR_APIS)
    for meta, c in daemon_pods(objs):
        assert "--metrics-port" not in c["args"]
        assert "metrics" not in [p["name"] for p in c.get("ports", [])]
        assert not any(k.startswith("prometheus.io/") for k in meta.get("annotations", {}))
    assert [p["name"] for p in server_service(objs)["spec"]["ports"]] == ["grpc"]
    assert not by_kind(objs, "ServiceMonitor") and not by_kind(objs, "PodMonitor")


def test_metrics_enabled_gives_every_daemon_the_flag_port_and_scrape_annotations() -> None:
    objs = render_metrics()
    pods = daemon_pods(objs)
    assert len(pods) == 3
    for meta, c in pods:
        assert flag(c["args"], "--metrics-port") == "9102" and flag(c["args"], "--metrics-host") == "0.0.0.0"
        assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in c["ports"]
        annotations = meta["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9102" and annotations["prometheus.io/path"] == "/metrics"
    ports = {p["name"]: p for p in server_service(objs)["spec"]["ports"]}
    assert ports["metrics"]["port"] == 9102 and ports["metrics"]["targetPort"] == "metrics"


def test_network_policies_let_scrapers_reach_the_metrics_port_only() -> None:
    objs = render_metrics()
    for policy in by_kind(objs, "NetworkPolicy"):
        rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 9102} in r.get("ports", [])]
        assert len(rules) == 1, policy["metadata"]["name"]
        assert rules[0]["ports"] == [{"protocol": "TCP", "port": 9102}]
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    objs = render_metrics("--set-json", f"metrics.from={json.dumps(peers)}")
    for policy in by_kind(objs, "NetworkPolicy"):
        rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 9102} in r.get("ports", [])]
        assert rules[0]["from"] == peers


def test_prometheus_operator_objects_only_where_the_api_is_served_or_forced() -> None:
    assert not by_kind(render_metrics(), "ServiceMonitor")  # helm template serves no monitoring.coreos.com
    for extra in (MONITOR_APIS, ("--set", "metrics.serviceMonitor.force=true")):
        objs = render_metrics(*extra)
        (monitor,) = by_kind(objs, "ServiceMonitor")
        (pods,) = by_kind(objs, "PodMonitor")
        assert monitor["apiVersion"] == pods["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= server_service(objs)["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        site_labels = next(iter(site_deployments(objs).values()))["spec"]["template"]["metadata"]["labels"]
        assert pods["spec"]["selector"]["matchLabels"].items() <= site_labels.items()
    objs = render("(chart defaults)", "--set", "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.force=true")
    assert not by_kind(objs, "ServiceMonitor"), "a monitor without metrics.enabled"


def test_metrics_render_lints_and_validates_strictly_on_1_20_apis(tmp_path: Path) -> None:
    helm, validator = find_tool("helm"), find_tool("kubernetes-validate")
    run([helm, "lint", "--strict", str(CHART), *METRICS_ON])
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(_render(helm, "(chart defaults)", METRICS_ON))
    proc = run([validator, "--strict", "--quiet", "-k", OLDEST_SCHEMA, str(manifest)], check=False)
    assert proc.returncode == 0, f"schema validation failed:\n{proc.stdout}\n{proc.stderr}"
    versions = {o["apiVersion"] for o in render_metrics("--kube-version", "1.20.2")}
    assert versions <= ALLOWED_API_VERSIONS, versions - ALLOWED_API_VERSIONS


@pytest.mark.parametrize("values", ["metrics.port=0", "metrics.serviceMonitor.interval=often"])
def test_bad_metrics_values_fail_the_schema(values: str) -> None:
    helm = find_tool("helm")
    proc = run([helm, "template", RELEASE, str(CHART), "--set", values], check=False)
    assert proc.returncode != 0 and "metrics" in proc.stderr, proc.stderr
