"""The e2e suite: deploy fl with its Helm chart on a real Kubernetes cluster and run hello-pt.

Where the cluster comes from, in this order:

1. ``--kubeconfig PATH`` (or ``FL_E2E_KUBECONFIG``): an existing cluster. Images are built and
   loaded by the command in ``--image-loader`` / ``FL_E2E_IMAGE_LOADER`` (a shell command run once per
   image with ``{tag}``, ``{dockerfile}``, ``{build_args}`` and ``{context}`` filled in; CI uses
   ``tests/e2e/local_cluster/images.sh build``), or are expected to be there already without one.
2. ``kind`` and a Docker engine: a cluster is created from ``kind-cluster.yaml`` (kept and reused
   with ``--keep-cluster``), the images are built with the docker SDK and loaded with ``kind load``.
3. Otherwise every test skips, saying what is missing.

On any failure the pods' logs, ``kubectl describe`` and the events go to ``--artifacts``
(default ``artifacts/e2e``), and the path is printed.
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

    def kubectl_run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True, text=True, check=check, timeout=timeout,
        )  # fmt: skip

    def helm_run(self, *args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.helm, "--kubeconfig", self.kubeconfig, *args], capture_output=True, text=True, check=check,
            timeout=timeout,
        )  # fmt: skip

    def image(self, name: str) -> tuple[str, str]:
        """(repository, tag) of one of fl's images as the cluster knows it."""
        return f"{self.image_prefix}{name}", IMAGE_TAG


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
    c.storage_class = _storage(c)
    try:
        yield c
    finally:
        for cleanup in reversed(c.cleanups):
            cleanup()
        if kind_gen is not None:
            with contextlib.suppress(StopIteration):
                next(kind_gen)  # deletes the kind cluster unless --keep-cluster


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


def dump_artifacts(c: Cluster, namespace: str, folder: Path) -> None:
    """Every pod's logs (current and previous), kubectl describe, and the events of a namespace."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, *args: str) -> None:
        proc = c.kubectl_run(*args, check=False, timeout=120)
        (folder / name).write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))

    save("all.txt", "get", "all,pvc,secrets,events", "-n", namespace, "-o", "wide")
    save("describe-pods.txt", "describe", "pods", "-n", namespace)
    save("events.txt", "get", "events", "-n", namespace, "--sort-by=.lastTimestamp")
    pods = c.kubectl_run("get", "pods", "-n", namespace, "-o", "name", check=False).stdout.split()
    for pod in pods:
        short = pod.split("/", 1)[-1]
        save(f"{short}.log", "logs", "-n", namespace, pod, "--all-containers", "--timestamps")
        save(f"{short}.previous.log", "logs", "-n", namespace, pod, "--all-containers", "--previous")
