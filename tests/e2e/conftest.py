"""The e2e suite: deploy fl with its Helm chart on a real Kubernetes cluster and run hello-pt.

Where the cluster comes from, in this order:

1. ``--kubeconfig PATH`` (or ``FL_E2E_KUBECONFIG``): an existing cluster. Images are built and
   loaded by the command in ``--image-loader`` / ``FL_E2E_IMAGE_LOADER`` (a shell command run once per
   image with ``{tag}``, ``{dockerfile}``, ``{build_args}`` and ``{context}`` filled in; CI uses
   ``tests/e2e/local_cluster/images.sh build``), or are expected to be there already without one.
2. ``kind`` and a Docker engine: a cluster is created from ``kind-cluster.yaml`` (kept and reused
   with ``--keep-cluster``), the images are built with the docker SDK and loaded with ``kind load``.
3. Otherwise every test skips, saying what is missing.

On any failure, of a test or of its set-up, ``dump_artifacts`` saves to ``--artifacts`` (default
``artifacts/e2e``) ``helm status`` and the release manifest (Secrets redacted), the pods' logs (and
the previous logs of restarted containers), ``kubectl describe`` of pods and nodes, the events, and
the server workspace's job status files and per-site logs; the path is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.tools import tool_path

REPO = Path(__file__).resolve().parents[2]
KIND_CLUSTER = "fl-e2e"
IMAGE_TAG = "e2e"
# CPU images: torch's CPU wheels, no torchvision (hello-pt imports it only for real CIFAR10).
CPU_BUILD_ARGS = {"VARIANT": "cpu", "TORCHVISION_SPEC": ""}
SITE_BUILD_ARGS = {"BASE_IMAGE": "ubuntu:24.04"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fl e2e")
    group.addoption("--kubeconfig", default=os.environ.get("FL_E2E_KUBECONFIG"), help="use this cluster")
    group.addoption(
        "--image-loader",
        default=os.environ.get("FL_E2E_IMAGE_LOADER"),
        help="command that builds and loads an image into the cluster: {tag} {dockerfile} {build_args} {context}",
    )
    group.addoption(
        "--image-prefix",
        default=os.environ.get("FL_E2E_IMAGE_PREFIX", ""),
        help="prefix of the image names the cluster knows them by (e.g. localhost/)",
    )
    group.addoption(
        "--build-arg",
        action="append",
        default=[a for a in os.environ.get("FL_E2E_BUILD_ARGS", "").split() if a],
        help="extra image build argument K=V (repeatable)",
    )
    group.addoption("--keep-cluster", action="store_true", help="keep (and reuse) the kind cluster")
    group.addoption(
        "--kubeconfig-b",
        default=os.environ.get("FL_E2E_KUBECONFIG_B"),
        help="a second cluster whose pods reach the first one's node address (test_two_clusters.py)",
    )
    group.addoption(
        "--image-import-b",
        default=os.environ.get("FL_E2E_IMAGE_IMPORT_B"),
        help="command that loads the images built for the first cluster into the second: {tags}",
    )
    group.addoption("--artifacts", default=str(REPO / "artifacts" / "e2e"), help="where failure dumps go")


@dataclass
class Cluster:
    kubeconfig: str
    helm: str
    kubectl: str
    image_prefix: str
    artifacts: Path
    storage_class: str | None = None
    cleanups: list[Any] = field(default_factory=list)

    def kubectl_run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True, text=True, check=check, timeout=timeout, input=input,
        )  # fmt: skip

    def helm_run(self, *args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.helm, "--kubeconfig", self.kubeconfig, *args], capture_output=True, text=True, check=check,
            timeout=timeout,
        )  # fmt: skip

    def image(self, name: str) -> tuple[str, str]:
        """(repository, tag) of one of fl's images as the cluster knows it."""
        return f"{self.image_prefix}{name}", IMAGE_TAG


def wait_until(what: str, timeout: float, condition: Any) -> Any:
    """``condition()``'s first true value, polled every 2 s; an AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _docker_engine() -> str | None:
    """None if a Docker engine answers, else why not."""
    try:
        import docker
    except ImportError:
        return "the docker Python SDK is not installed (pip install docker)"
    try:
        docker.from_env().ping()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__})"
    return None


def _build_args(extra: list[str], site: bool) -> dict[str, str]:
    args = dict(CPU_BUILD_ARGS)
    if site:
        args.update(SITE_BUILD_ARGS)
    for item in extra:
        key, _, value = item.partition("=")
        args[key] = value
    return args


def _images(config: pytest.Config) -> list[tuple[str, str, dict[str, str]]]:
    extra = list(config.getoption("--build-arg"))
    return [
        ("fl-server", "images/server/Dockerfile", _build_args(extra, site=False)),
        ("fl-site", "images/site/Dockerfile", _build_args(extra, site=True)),
    ]


def _load_with_command(loader: str, config: pytest.Config, prefix: str) -> None:
    for name, dockerfile, args in _images(config):
        build_args = " ".join(f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in args.items())
        command = loader.format(
            tag=shlex.quote(f"{prefix}{name}:{IMAGE_TAG}"),
            dockerfile=shlex.quote(str(REPO / dockerfile)),
            build_args=build_args,
            context=shlex.quote(str(REPO)),
        )
        started = time.monotonic()
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            pytest.fail(f"image loader failed for {name}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"[e2e] image {prefix}{name}:{IMAGE_TAG} built and loaded in {time.monotonic() - started:.0f} s")


def _kind_cluster(config: pytest.Config) -> Iterator[str]:
    """A kind cluster from kind-cluster.yaml, with fl's images loaded; yields its kubeconfig."""
    import docker

    kind = shutil.which("kind")
    assert kind is not None
    existing = subprocess.run([kind, "get", "clusters"], capture_output=True, text=True).stdout.split()
    created = False
    if KIND_CLUSTER not in existing:
        config_file = str(REPO / "kind-cluster.yaml")
        subprocess.run(
            [kind, "create", "cluster", "--name", KIND_CLUSTER, "--config", config_file, "--wait", "5m"], check=True
        )
        created = True
    kubeconfig = str(Path(config.getoption("--artifacts")) / "kind.kubeconfig")
    Path(kubeconfig).parent.mkdir(parents=True, exist_ok=True)
    Path(kubeconfig).write_text(
        subprocess.run(
            [kind, "get", "kubeconfig", "--name", KIND_CLUSTER], capture_output=True, text=True, check=True
        ).stdout
    )
    client = docker.from_env()
    for name, dockerfile, args in _images(config):
        tag = f"{name}:{IMAGE_TAG}"
        client.images.build(path=str(REPO), dockerfile=dockerfile, buildargs=args, tag=tag, rm=True)
        subprocess.run([kind, "load", "docker-image", tag, "--name", KIND_CLUSTER], check=True)
    try:
        yield kubeconfig
    finally:
        if created and not config.getoption("--keep-cluster"):
            subprocess.run([kind, "delete", "cluster", "--name", KIND_CLUSTER], check=False)


@pytest.fixture(scope="session")
def cluster(pytestconfig: pytest.Config) -> Iterator[Cluster]:
    helm, kubectl = tool_path("helm"), tool_path("kubectl")
    missing_tools = [n for n, p in (("helm", helm), ("kubectl", kubectl)) if p is None]
    if missing_tools:
        pytest.skip(f"{' and '.join(missing_tools)} not found (bash tools/install-tools.sh installs both)")
    assert helm is not None and kubectl is not None
    artifacts = Path(pytestconfig.getoption("--artifacts"))
    kubeconfig = pytestconfig.getoption("--kubeconfig")
    prefix = pytestconfig.getoption("--image-prefix")
    kind_gen: Iterator[str] | None = None
    if kubeconfig:
        loader = pytestconfig.getoption("--image-loader")
        if loader:
            _load_with_command(loader, pytestconfig, prefix)
    else:
        why_not = "kind is not on PATH" if shutil.which("kind") is None else _docker_engine()
        if why_not:
            pytest.skip(
                f"no cluster for the e2e suite: {why_not}; give --kubeconfig PATH (or FL_E2E_KUBECONFIG) for an "
                "existing cluster, or run tests/e2e/local_cluster (see its README)"
            )
        kind_gen = _kind_cluster(pytestconfig)
        kubeconfig = next(kind_gen)
    c = Cluster(kubeconfig, helm, kubectl, prefix, artifacts)
    try:
        c.storage_class = _storage(c)
    except Exception:
        dump_cluster(c, artifacts / "cluster-setup")
        raise
    try:
        yield c
    finally:
        for cleanup in reversed(c.cleanups):
            cleanup()
        if kind_gen is not None:
            with contextlib.suppress(StopIteration):
                next(kind_gen)  # deletes the kind cluster unless --keep-cluster


@pytest.fixture(scope="session")
def cluster_b(cluster: Cluster, pytestconfig: pytest.Config) -> Cluster:
    """The second cluster (after the first, whose site image it imports: B runs a sites-only release), or a
    skip saying why there is none."""
    kubeconfig = pytestconfig.getoption("--kubeconfig-b")
    if not kubeconfig:
        why = os.environ.get("FL_E2E_CLUSTER_B_MISSING") or "no second cluster was given"
        pytest.skip(
            f"{why}; give --kubeconfig-b PATH (or FL_E2E_KUBECONFIG_B) for a cluster whose pods reach the first "
            "cluster's node address (tests/e2e/run_local.sh starts one: tests/e2e/local_cluster/README.md)"
        )
    importer = pytestconfig.getoption("--image-import-b")
    if importer:
        tags = shlex.quote(":".join(cluster.image("fl-site")))
        started = time.monotonic()
        proc = subprocess.run(importer.format(tags=tags), shell=True, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            pytest.fail(f"image import into cluster B failed: {importer}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"[e2e] image {tags} imported into cluster B in {time.monotonic() - started:.0f} s")
    return Cluster(kubeconfig, cluster.helm, cluster.kubectl, cluster.image_prefix, cluster.artifacts)


def _storage(c: Cluster) -> str | None:
    """A StorageClass for the server's workspace: the cluster's default, else hostPath volumes we make."""
    classes = json.loads(c.kubectl_run("get", "storageclass", "-o", "json").stdout)["items"]
    for sc in classes:
        annotations = sc["metadata"].get("annotations", {})
        if annotations.get("storageclass.kubernetes.io/is-default-class") == "true":
            return None  # the default one serves the chart's claim
    return "fl-e2e-hostpath"


def make_hostpath_volume(c: Cluster, name: str, size: str = "2Gi") -> None:
    """A PersistentVolume on this machine's disk for clusters without a provisioner (local cluster)."""
    folder = Path("/tmp") / "fl-e2e-volumes" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.chown(folder, 10001, 10001)  # the chart's fixed uid; hostPath volumes get no fsGroup
    manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"fl-e2e": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "fl-e2e-hostpath",
            "hostPath": {"path": str(folder), "type": "Directory"},
        },
    }
    subprocess.run(
        [c.kubectl, "--kubeconfig", c.kubeconfig, "apply", "-f", "-"], input=json.dumps(manifest), text=True,
        check=True, capture_output=True,
    )  # fmt: skip
    c.cleanups.append(lambda: (c.kubectl_run("delete", "pv", name, "--wait=false", check=False),
                               shutil.rmtree(folder, ignore_errors=True)))  # fmt: skip


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# Prints the server workspace's job status files and per-site logs (the last 256 KiB of each) as one
# JSON object {relative path: text}; run in the server pod with its python.
_WORKSPACE_DUMP = """
import glob, json, os
root = '/var/lib/fl/workspace'
out = {}
for pattern in ('jobs/*/status.json', 'jobs/*/meta.json', 'jobs/*/logs/*.log', '*.json'):
    for path in sorted(glob.glob(os.path.join(root, pattern))):
        with open(path, 'rb') as f:
            f.seek(max(0, os.path.getsize(path) - 262144))
            out[os.path.relpath(path, root)] = f.read().decode('utf-8', 'replace')
print(json.dumps(out))
"""


def _redact_secrets(manifest: str) -> str:
    """A rendered manifest with every Secret's data replaced by its keys (no private keys in artifacts)."""
    import yaml

    docs = []
    for doc in yaml.safe_load_all(manifest):
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            doc["data"] = {key: "<redacted>" for key in (doc.get("data") or {})}
        docs.append(doc)
    return yaml.safe_dump_all(docs)


def dump_artifacts(c: Cluster, namespace: str, folder: Path, release: str | None = None) -> None:
    """What a failure needs explained: the release (helm status, its manifest with Secrets redacted), every
    pod's logs and the previous logs of each restarted container, kubectl describe of pods and nodes, the
    events, and the server workspace's job status files and per-site logs. Never raises."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, proc: subprocess.CompletedProcess[str], text: str | None = None) -> None:
        body = proc.stdout if text is None else text
        (folder / name).write_text(body + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))

    def kubectl(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        proc = c.kubectl_run(*args, check=False, timeout=120)
        save(name, proc)
        return proc

    steps: list[tuple[str, Any]] = []
    if release:
        steps.append(
            (
                "helm status",
                lambda: save(
                    "helm-status.txt", c.helm_run("status", release, "-n", namespace, check=False, timeout=120)
                ),
            )
        )
        steps.append(("helm manifest", lambda: _save_manifest(c, release, namespace, save)))
    steps += [
        ("objects", lambda: kubectl("all.txt", "get", "all,pvc,secrets,events", "-n", namespace, "-o", "wide")),
        ("pods", lambda: kubectl("describe-pods.txt", "describe", "pods", "-n", namespace)),
        ("nodes", lambda: kubectl("describe-nodes.txt", "describe", "nodes")),
        ("events", lambda: kubectl("events.txt", "get", "events", "-n", namespace, "--sort-by=.lastTimestamp")),
        ("logs", lambda: _save_pod_logs(c, namespace, kubectl)),
    ]
    if release:
        steps.append(("workspace", lambda: _save_workspace(c, namespace, release, folder)))
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # one failing step must not hide the others
            (folder / "dump-errors.txt").open("a").write(f"{what}: {type(exc).__name__}: {exc}\n")


def _save_manifest(c: Cluster, release: str, namespace: str, save: Any) -> None:
    proc = c.helm_run("get", "manifest", release, "-n", namespace, check=False, timeout=120)
    save("helm-manifest.yaml", proc, _redact_secrets(proc.stdout) if proc.returncode == 0 else proc.stdout)


def _save_pod_logs(c: Cluster, namespace: str, kubectl: Any) -> None:
    pods = json.loads(c.kubectl_run("get", "pods", "-n", namespace, "-o", "json", check=False).stdout or "{}")
    for pod in pods.get("items", []):
        name = pod["metadata"]["name"]
        kubectl(f"{name}.log", "logs", "-n", namespace, name, "--all-containers", "--timestamps")
        statuses = pod.get("status", {})
        for status in statuses.get("initContainerStatuses", []) + statuses.get("containerStatuses", []):
            if status.get("restartCount", 0) > 0:
                kubectl(f"{name}.{status['name']}.previous.log", "logs", "-n", namespace, name, "-c", status["name"],
                        "--previous", "--timestamps")  # fmt: skip


def _save_workspace(c: Cluster, namespace: str, release: str, folder: Path) -> None:
    proc = c.kubectl_run("exec", "-n", namespace, f"deploy/{release}-server", "--", "python", "-c", _WORKSPACE_DUMP,
                         check=False, timeout=120)  # fmt: skip
    if proc.returncode != 0:
        (folder / "workspace-error.txt").write_text(proc.stdout + proc.stderr)
        return
    for relative, text in json.loads(proc.stdout).items():
        target = folder / "workspace" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def dump_cluster(c: Cluster, folder: Path) -> None:
    """Cluster-wide state for a failure outside any release: nodes, every pod, the events. Never raises."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, args in (("describe-nodes.txt", ("describe", "nodes")), ("pods.txt", ("get", "pods", "-A", "-o", "wide")),
                       ("events.txt", ("get", "events", "-A", "--sort-by=.lastTimestamp"))):  # fmt: skip
        try:
            proc = c.kubectl_run(*args, check=False, timeout=120)
            (folder / name).write_text(proc.stdout + proc.stderr)
        except Exception as exc:
            (folder / name).write_text(f"{type(exc).__name__}: {exc}")
    print(f"\n[e2e] cluster state saved in {folder}")
