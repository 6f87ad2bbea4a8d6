"""The Kubernetes launcher: a site's job script runs in a pod of its own, created for the job.

The site's JobRunner starts ``python -m fl.site.kube_launch --config FILE ... -- <script command>``
in place of the script (:func:`relay_command`). This relay creates the job pod (the site's GPU
request, resources, node selector, tolerations, data volumes, image; labels naming site and job;
an ownerReference to the site pod), waits until it runs (reporting why it waits, and failing with
the reason on ImagePullBackOff, CreateContainerConfigError, OOMKilled, or past the schedule
deadline), then relays: the pod's shim (:mod:`fl.site.kube_shim`) dials back over TLS, pinning
the relay's per-job ephemeral certificate (:mod:`fl.site.kube_tls`), and presents a per-job token
(:mod:`fl.site.kube_wire`); token and fingerprint reach the pod in a Secret of the job's own, owned
by its pod (deleted with it), never in the pod's spec. The relay carries the script's LineChannel
messages and its model/result files between the pod and the runner's socketpair, prints the
script's output lines, relays the job's state folder (``FL_STATE_DIR``, ``flare.get_state()``) to
the pod at the start and back at the end (a zip, bounded by ``maxStateBytes``), and exits with the
script's exit code. The pod is deleted when the relay ends, on SIGTERM (the runner stops the job,
or the site dies: the runner starts it with SIGTERM as its parent-death signal), and a site that
starts deletes what its previous life left (:func:`delete_stale_pods`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fl.channel import ChannelClosed, LineChannel
from fl.server.jobstore import JobError, extract_zip
from fl.site.kube_tls import RelayCertificate
from fl.site.kube_wire import Wire, authenticate, zip_folder, zip_state

__all__ = [
    "JOB_ROOT",
    "LauncherConfig",
    "PodApi",
    "PodState",
    "build_pod",
    "build_secret",
    "delete_stale_pods",
    "main",
    "owner_reference",
    "pod_state",
    "relay_command",
]

#: Where the job pod keeps the job's app and exchange files (an emptyDir).
JOB_ROOT = "/fl-job"
MANAGED_BY = "fl-site-launcher"
#: Container waiting reasons that no amount of waiting fixes: the job fails at once with the reason.
FATAL_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
#: Connections the relay checks for the token at the same time; more are closed at once.
MAX_PENDING_AUTH = 16
#: The job pod's variables that come from the job's Secret, and their keys in it.
SECRET_KEYS = {"FL_RELAY_TOKEN": "token", "FL_RELAY_CERT_SHA256": "cert-sha256"}


def _say(line: str) -> None:
    """One line of the relay's own in the script's output (the runner logs and forwards it); a runner
    that is gone (its pipe broken) must not stop the relay from deleting the pod."""
    with contextlib.suppress(OSError):
        print(f"kube-launch: {line}", flush=True)


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class LauncherConfig:
    """What a site's job pods look like and how long they may take (the chart writes it as JSON)."""

    image: str
    namespace: str = ""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[dict[str, Any]] = field(default_factory=list)
    service_account_name: str = ""
    gpus: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    runtime_class_name: str = ""
    priority_class_name: str = ""
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    pod_security_context: dict[str, Any] = field(default_factory=dict)
    container_security_context: dict[str, Any] = field(default_factory=dict)
    shm_size: str = ""
    shim_command: list[str] = field(default_factory=lambda: ["python", "-m", "fl.site.kube_shim"])
    schedule_timeout_s: float = 600.0
    pending_log_s: float = 60.0
    connect_timeout_s: float = 300.0
    max_file_bytes: int = 64 * 2**30
    #: The job's state folder (flare.get_state()) each way: the store's own 1 GiB of tensors, and room for its JSON.
    max_state_bytes: int = 2**30 + 64 * 2**20
    kubeconfig: str = ""

    _KEYS = {
        "image": "image",
        "namespace": "namespace",
        "imagePullPolicy": "image_pull_policy",
        "imagePullSecrets": "image_pull_secrets",
        "serviceAccountName": "service_account_name",
        "gpus": "gpus",
        "gpuResource": "gpu_resource",
        "resources": "resources",
        "nodeSelector": "node_selector",
        "tolerations": "tolerations",
        "affinity": "affinity",
        "runtimeClassName": "runtime_class_name",
        "priorityClassName": "priority_class_name",
        "volumes": "volumes",
        "volumeMounts": "volume_mounts",
        "env": "env",
        "labels": "labels",
        "podSecurityContext": "pod_security_context",
        "containerSecurityContext": "container_security_context",
        "shmSize": "shm_size",
        "shimCommand": "shim_command",
        "scheduleTimeoutSeconds": "schedule_timeout_s",
        "pendingLogSeconds": "pending_log_s",
        "connectTimeoutSeconds": "connect_timeout_s",
        "maxFileBytes": "max_file_bytes",
        "maxStateBytes": "max_state_bytes",
        "kubeconfig": "kubeconfig",
    }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "launcher config") -> LauncherConfig:
        """Build from the chart's camelCase JSON; unknown keys and wrong types are errors naming the key."""
        unknown = sorted(set(data) - set(cls._KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(cls._KEYS)}")
        if not isinstance(data.get("image"), str) or not data["image"]:
            raise ValueError(f"{where}: 'image' (the job pods' image) is required")
        defaults = cls(image="x")
        kwargs: dict[str, Any] = {}
        for key, attr in cls._KEYS.items():
            if key not in data or data[key] is None:
                continue
            value, default = data[key], getattr(defaults, attr)
            expected = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(f"{where}: {key}: {value!r} is not a {type(default).__name__}")
            kwargs[attr] = value
        config = cls(**kwargs)
        if config.gpus < 0:
            raise ValueError(f"{where}: gpus: {config.gpus} must be >= 0")
        for key in ("schedule_timeout_s", "connect_timeout_s", "pending_log_s"):
            if getattr(config, key) <= 0:
                raise ValueError(f"{where}: {key}: must be > 0")
        return config

    @classmethod
    def load(cls, path: Path) -> LauncherConfig:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"launcher config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"launcher config {path}: must be a JSON object")
        return cls.from_dict(data, where=f"launcher config {path}")

    def resolved_namespace(self) -> str:
        """The namespace pods go to: the config's, else the site pod's own (downward API or service account)."""
        if self.namespace:
            return self.namespace
        if os.environ.get("FL_POD_NAMESPACE"):
            return os.environ["FL_POD_NAMESPACE"]
        with contextlib.suppress(OSError):
            return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
        return "default"


# ---------------------------------------------------------------------------------------------- pod spec
def _label_value(text: str) -> str:
    """A valid label value (63 characters of [A-Za-z0-9._-], alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63].strip("-._") or "x"


def pod_labels(site: str, job_id: str = "") -> dict[str, str]:
    """The labels that name a job pod's site (and job); the selector of :func:`delete_stale_pods`."""
    labels = {"app.kubernetes.io/managed-by": MANAGED_BY, "fl/site": _label_value(site)}
    if job_id:
        labels["fl/job"] = _label_value(job_id)
    return labels


def pod_name(site: str, job_id: str) -> str:
    """fl-job-<site>-<job>-<random>: unique per run (a job may run its script more than once)."""
    stem = re.sub(r"[^a-z0-9-]", "-", f"fl-job-{site}-{job_id[:8]}".lower())[:50].strip("-")
    return f"{stem}-{secrets.token_hex(3)}"


def _resources(config: LauncherConfig) -> dict[str, Any]:
    """The container's resources with the GPU request and limit set exactly when gpus > 0.

    Quantities are strings, as the API's schema (and the client's validation) has them.
    """
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        given = dict(config.resources.get(part) or {})
        values = {k: str(v) for k, v in given.items() if k != config.gpu_resource and v is not None}
        if config.gpus > 0:
            values[config.gpu_resource] = str(config.gpus)
        if values:
            out[part] = values
    return out


def build_pod(
    config: LauncherConfig,
    *,
    name: str,
    site: str,
    job_id: str,
    relay_address: str,
    secret: str,
    owner: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The job pod's manifest: the site's scheduling and resources, the shim as its command, owned by the site pod;
    the token and the relay's certificate fingerprint come from the Secret ``secret`` (:func:`build_secret`)."""
    env: list[dict[str, Any]] = [
        {"name": "FL_RELAY_ADDRESS", "value": relay_address},
        *(
            {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for variable, key in SECRET_KEYS.items()
        ),
        {"name": "FL_JOB_ROOT", "value": JOB_ROOT},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if config.gpus == 0:  # a node whose default runtime is NVIDIA's must not hand it every GPU
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    env += [e for e in config.env if e.get("name") not in {x["name"] for x in env}]
    mounts: list[dict[str, Any]] = [{"name": "fl-job", "mountPath": JOB_ROOT}, {"name": "fl-tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "fl-job", "emptyDir": {}}, {"name": "fl-tmp", "emptyDir": {}}]
    if config.shm_size:
        mounts.append({"name": "fl-shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "fl-shm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
    container: dict[str, Any] = {
        "name": "job",
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(config.shim_command),
        "env": env,
        "resources": _resources(config),
        "volumeMounts": mounts + list(config.volume_mounts),
    }
    if config.container_security_context:
        container["securityContext"] = config.container_security_context
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes + list(config.volumes),
    }
    optional = {
        "serviceAccountName": config.service_account_name,
        "imagePullSecrets": config.image_pull_secrets,
        "nodeSelector": config.node_selector,
        "tolerations": config.tolerations,
        "affinity": config.affinity,
        "runtimeClassName": config.runtime_class_name,
        "priorityClassName": config.priority_class_name,
        "securityContext": config.pod_security_context,
    }
    spec.update({k: v for k, v in optional.items() if v})
    metadata: dict[str, Any] = {"name": name, "labels": {**config.labels, **pod_labels(site, job_id)}}
    metadata["annotations"] = {"fl/job-id": job_id, "fl/site": site}
    if owner and owner.get("name") and owner.get("uid"):
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"], "blockOwnerDeletion": False}
        ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def build_secret(
    config: LauncherConfig, *, name: str, site: str, job_id: str, token: str, sha256: str
) -> dict[str, Any]:
    """The job's Secret: the relay's token and its certificate's fingerprint, labelled as the job pod is
    (:func:`delete_stale_pods` finds it), owned by the pod once that exists (:meth:`PodApi.own_secret`)."""
    metadata = {
        "name": name,
        "labels": {**config.labels, **pod_labels(site, job_id)},
        "annotations": {"fl/job-id": job_id},
    }
    data = {SECRET_KEYS["FL_RELAY_TOKEN"]: token, SECRET_KEYS["FL_RELAY_CERT_SHA256"]: sha256}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata, "stringData": data}


def owner_reference(pod: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to ``pod`` (the API's JSON): what is owned goes when the pod goes."""
    meta = pod["metadata"]
    return {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"], "blockOwnerDeletion": False}


# ---------------------------------------------------------------------------------------------- pod status
@dataclass(frozen=True)
class PodState:
    """What a pod's status means for the job: running, waiting (why), failed (why), or ended (its exit code)."""

    phase: str
    running: bool = False
    waiting: str = ""
    fatal: str = ""
    exit_code: int | None = None


def pod_state(pod: Mapping[str, Any] | None) -> PodState:
    """Map a pod (the API's JSON, camelCase) to a PodState; None means the pod is gone."""
    if pod is None:
        return PodState("Gone", fatal="the job pod was deleted (by someone else, or the node went away)")
    status = pod.get("status") or {}
    phase = str(status.get("phase") or "Pending")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        waiting, terminated = state.get("waiting"), state.get("terminated")
        if waiting and waiting.get("reason") in FATAL_WAITING:
            return PodState(phase, fatal=_reason(waiting))
        if terminated:
            code = int(terminated.get("exitCode") or 0)
            if terminated.get("reason") == "OOMKilled":
                limit = (pod.get("spec") or {}).get("containers", [{}])[0].get("resources", {}).get("limits", {})
                memory = limit.get("memory", "none set")
                return PodState(
                    phase,
                    fatal=f"OOMKilled: the job pod ran out of memory (memory limit {memory})",
                    exit_code=code or 137,
                )
            return PodState(phase, exit_code=code)
        if state.get("running"):
            return PodState(phase, running=True)
        if waiting:
            return PodState(phase, waiting=_reason(waiting))
    if phase == "Failed":
        return PodState(phase, fatal=_reason(status) if status.get("reason") else "the job pod failed", exit_code=1)
    if phase == "Succeeded":
        return PodState(phase, exit_code=0)
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return PodState(phase, waiting=_reason(condition) or "not scheduled yet")
    return PodState(phase, running=phase == "Running", waiting="" if phase == "Running" else "waiting to be scheduled")


def _reason(obj: Mapping[str, Any]) -> str:
    reason, message = str(obj.get("reason") or ""), str(obj.get("message") or "")
    return f"{reason}: {message}" if reason and message else reason or message


# ---------------------------------------------------------------------------------------------- the API
class PodApi(Protocol):
    """The few pod operations the launcher needs, on dicts (the API's JSON)."""

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def read(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete(self, namespace: str, name: str) -> None: ...
    def list(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...
    def log_tail(self, namespace: str, name: str, lines: int) -> str: ...
    def create_secret(self, namespace: str, body: dict[str, Any]) -> None: ...
    def own_secret(self, namespace: str, name: str, owner: dict[str, Any]) -> None: ...
    def delete_secret(self, namespace: str, name: str) -> None: ...
    def delete_secrets(self, namespace: str, selector: str) -> None: ...


class KubePodApi:
    """PodApi through the ``kubernetes`` client: in-cluster credentials, or a kubeconfig file."""

    def __init__(self, kubeconfig: str = "") -> None:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        self._api = client.CoreV1Api()
        self._exception: type[Exception] = ApiException

    def _json(self, obj: Any) -> dict[str, Any]:
        data: dict[str, Any] = self._api.api_client.sanitize_for_serialization(obj)
        return data

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self._api.create_namespaced_pod(namespace, body))  # type: ignore[arg-type]  # a dict is accepted

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json(self._api.read_namespaced_pod(name, namespace))
        except self._exception as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise

    def delete(self, namespace: str, name: str) -> None:
        try:
            self._api.delete_namespaced_pod(name, namespace, grace_period_seconds=5)
        except self._exception as exc:
            if getattr(exc, "status", None) != 404:
                raise

    def list(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self._api.list_namespaced_pod(namespace, label_selector=selector)
        return [self._json(p) for p in pods.items]

    def log_tail(self, namespace: str, name: str, lines: int) -> str:
        try:
            return str(self._api.read_namespaced_pod_log(name, namespace, tail_lines=lines))
        except self._exception:
            return ""

    def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        self._api.create_namespaced_secret(namespace, body)  # type: ignore[arg-type]  # a dict is accepted

    def own_secret(self, namespace: str, name: str, owner: dict[str, Any]) -> None:
        # a JSON patch (a list body) sets the one owner; a merge patch would add it to any other
        patch = [{"op": "add", "path": "/metadata/ownerReferences", "value": [owner]}]
        self._api.patch_namespaced_secret(name, namespace, patch)

    def delete_secret(self, namespace: str, name: str) -> None:
        try:
            self._api.delete_namespaced_secret(name, namespace)
        except self._exception as exc:
            if getattr(exc, "status", None) != 404:
                raise

    def delete_secrets(self, namespace: str, selector: str) -> None:
        # deletecollection, not list: the site's Role must not let it read the namespace's other Secrets
        self._api.delete_collection_namespaced_secret(namespace, label_selector=selector)


def delete_stale_pods(
    api: PodApi,
    namespace: str,
    site: str,
    *,
    labels: Mapping[str, str] | None = None,
    log: Callable[[str], None] = _say,
) -> int:
    """Delete every job pod (and job Secret) this site's earlier life left; how many pods. Called when a site starts.

    Selected by the site's labels and the config's (the chart's release labels), so that a site of
    the same name in another release in the namespace keeps its pods. A Secret goes with its pod;
    one whose pod was never created (the relay died in between) is deleted here.
    """
    selector = ",".join(f"{k}={v}" for k, v in sorted({**(labels or {}), **pod_labels(site)}.items()))
    pods = api.list(namespace, selector)
    for pod in pods:
        name = pod["metadata"]["name"]
        log(f"deleting job pod {name} left by an earlier run of site {site}")
        api.delete(namespace, name)
    api.delete_secrets(namespace, selector)
    return len(pods)


# ---------------------------------------------------------------------------------------------- the relay
def relay_command(
    config_path: Path,
    job_dir: Path,
    exchange: Path,
    env_names: Sequence[str],
    command: Sequence[str],
    *,
    distributed: bool = False,
) -> list[str]:
    """What the runner starts in place of ``command`` when the site launches jobs on Kubernetes;
    ``env_names``: the variables the script gets beyond the site's own (the job's and the runner's);
    ``distributed``: ``command`` is torch.distributed.run's (its rank 0 connects to the pod's shim)."""
    args = [sys.executable, "-u", "-m", "fl.site.kube_launch", "--config", str(config_path)]
    args += ["--job-dir", str(job_dir), "--exchange", str(exchange)]
    if distributed:
        args.append("--distributed")
    for name in sorted(set(env_names)):
        args += ["--pass-env", name]
    return [*args, "--", *command]


class Relay:
    """One job script's run in a pod: create it, wait for it, relay, and delete it."""

    def __init__(self, config: LauncherConfig, api: PodApi, args: argparse.Namespace, runner: LineChannel) -> None:
        self.config, self.api, self.args, self.runner = config, api, args, runner
        self.site = os.environ.get("FL_SITE_NAME", "site")
        self.job_id = os.environ.get("FL_JOB_ID", "job")
        self.namespace = config.resolved_namespace()
        self.name = pod_name(self.site, self.job_id)
        self.token = secrets.token_urlsafe(32)
        self.certificate = RelayCertificate.generate()
        self._tls = self.certificate.server_context()
        self.secret_created = False
        self.stop = threading.Event()
        self.pod_done = threading.Event()
        self.exit_code: int | None = None
        #: Set when the pod's state could not be kept (too large, a bad archive): the run fails, saying so.
        self.state_failed = False
        self.created = False
        self._deleted = False
        self._cleanup_lock = threading.Lock()
        self.allowed_results: set[str] = set()
        self._accepted: queue.Queue[Wire] = queue.Queue()
        self._connected = threading.Event()

    # -- lifecycle
    def run(self) -> int:
        listener = socket.create_server(("0.0.0.0", 0))
        port = listener.getsockname()[1]
        host = os.environ.get("FL_POD_IP") or "127.0.0.1"
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        owner = {"name": os.environ.get("FL_POD_NAME", ""), "uid": os.environ.get("FL_POD_UID", "")}
        where = {"name": self.name, "site": self.site, "job_id": self.job_id}
        secret = build_secret(self.config, **where, token=self.token, sha256=self.certificate.sha256)
        body = build_pod(self.config, **where, relay_address=f"{host}:{port}", secret=self.name, owner=owner)
        self.secret_created = True  # before the call: a Secret created by a call that then failed is deleted too
        self.api.create_secret(self.namespace, secret)
        self.created = True
        pod = self.api.create(self.namespace, body)
        self.api.own_secret(self.namespace, self.name, owner_reference(pod))
        _say(f"job pod {self.name} created in namespace {self.namespace} ({self._ask()}); waiting for it to run")
        wire = self._wait_for_pod()
        listener.close()
        if isinstance(wire, int):
            return wire
        return self._serve(wire)

    def cleanup(self) -> None:
        """Delete the pod if it was created (once, from whichever thread comes first)."""
        with self._cleanup_lock:  # held while deleting: the other caller returns once the pod is gone
            if not self.secret_created or self._deleted:
                return
            self._deleted = True
            if self.created:
                with contextlib.suppress(Exception):
                    self.api.delete(self.namespace, self.name)
                    _say(f"job pod {self.name} deleted")
            with contextlib.suppress(Exception):  # the garbage collector deletes it with the pod; not waiting for it
                self.api.delete_secret(self.namespace, self.name)

    def stop_on_signals(self) -> None:
        """SIGTERM/SIGINT/SIGHUP (the job stopped, or the site died) delete the pod at once, whatever the
        main thread is doing, and end the relaying. The handlers themselves take no lock (a signal that
        interrupts one taking a lock would deadlock): the signal wakes a thread, which does the work."""
        wake, woken = os.pipe()
        os.set_blocking(woken, False)
        signal.set_wakeup_fd(woken)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)

        def on_signal() -> None:
            os.read(wake, 1)
            self.stop.set()
            self.cleanup()

        threading.Thread(target=on_signal, name="fl-kube-signals", daemon=True).start()

    def _ask(self) -> str:
        gpus = f"{self.config.gpus} x {self.config.gpu_resource}" if self.config.gpus else "no GPU"
        return f"image {self.config.image}, {gpus}"

    def _accept(self, listener: socket.socket) -> None:
        """Check each connection in a thread of its own (a silent one cannot hold up the pod's); at most
        MAX_PENDING_AUTH at a time, the rest closed at once."""
        pending = threading.BoundedSemaphore(MAX_PENDING_AUTH)
        while not self._connected.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                return
            if not pending.acquire(blocking=False):
                sock.close()
                continue
            threading.Thread(target=self._check, args=(sock, peer[0], pending), daemon=True).start()

    def _check(self, sock: socket.socket, peer: str, pending: threading.BoundedSemaphore) -> None:
        try:
            wire, why = authenticate(sock, self.token, self._tls)
        finally:
            pending.release()
        if wire is None:
            _say(f"refused a connection from {peer}: {why}")
        elif self._connected.is_set():
            wire.close()  # the token is for one connection
        else:
            self._connected.set()
            self._accepted.put(wire)

    def _read_state(self) -> PodState:
        """The pod's state; an API error is a wait (counted against the deadlines), not a failure."""
        try:
            return pod_state(self.api.read(self.namespace, self.name))
        except Exception as exc:
            return PodState("Unknown", waiting=f"cannot read the pod: {type(exc).__name__}: {exc}")

    def _wait_for_pod(self) -> Wire | int:
        """The shim's connection, or the exit code when the pod cannot run (having said why)."""
        started = time.monotonic()
        running_since: float | None = None
        last_note = started
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                return self._accepted.get(timeout=1.0)
            state = self._read_state()
            now = time.monotonic()
            if state.fatal:
                return self._fail(state.fatal, state.exit_code)
            if state.exit_code is not None:
                return self._fail(
                    f"the job pod ended (exit code {state.exit_code}) before it connected", state.exit_code or 1
                )
            if state.running:
                running_since = running_since or now
                if now - running_since > self.config.connect_timeout_s:
                    return self._fail(
                        f"the job pod runs but did not connect within {self.config.connect_timeout_s:.0f} s"
                    )
                continue
            waited = now - started
            if waited > self.config.schedule_timeout_s:
                return self._fail(
                    f"the job pod was not running after {self.config.schedule_timeout_s:.0f} s "
                    f"(scheduleTimeoutSeconds): {state.waiting or state.phase}"
                )
            if now - last_note >= self.config.pending_log_s:
                last_note = now
                _say(f"job pod {self.name} still {state.phase} after {waited:.0f} s: {state.waiting}")
        return 143

    def _fail(self, why: str, code: int | None = None) -> int:
        _say(f"job pod {self.name} failed: {why}")
        tail = ""
        with contextlib.suppress(Exception):  # the reason above is what matters; the log tail is a bonus
            tail = self.api.log_tail(self.namespace, self.name, 20).strip()
        if tail:
            _say("last lines of the job pod's log:")
            for line in tail.splitlines():
                print(line, flush=True)
        return code or 1

    # -- relaying
    def _serve(self, wire: Wire) -> int:
        _say(f"job pod {self.name} connected; starting the training script in it")
        env = {name: os.environ[name] for name in self.args.pass_env if name in os.environ}
        wire.send(
            {
                "op": "_start",
                "command": self.args.command,
                "env": env,
                "job_dir": str(self.args.job_dir),
                "exchange": str(self.args.exchange),
                "python": sys.executable,
                "distributed": self.args.distributed,
                "state_dir": os.environ.get("FL_STATE_DIR", ""),
                "state_limit": self.config.max_state_bytes,
            }
        )
        with tempfile.TemporaryDirectory(prefix="fl-kube-") as tmp:
            archive = Path(tmp) / "app.zip"
            zip_folder(self.args.job_dir / "app", archive)
            wire.send({"op": "_app"}, archive)
            state_zip = Path(tmp) / "state.zip"
            state_size = zip_state(self._state_dir(), state_zip)
            if state_size is not None and state_size > self.config.max_state_bytes:
                return self._fail(
                    f"the job's state on this site ({state_size} bytes) exceeds maxStateBytes "
                    f"({self.config.max_state_bytes}): raise it in the launcher config"
                )
            wire.send({"op": "_state"}, state_zip if state_size is not None else None)
        threading.Thread(target=self._pod_to_runner, args=(wire,), daemon=True).start()
        threading.Thread(target=self._runner_to_pod, args=(wire,), daemon=True).start()
        checked = time.monotonic()
        while not (self.pod_done.wait(0.5) or self.stop.is_set()):
            if time.monotonic() - checked < 5.0:
                continue
            checked = time.monotonic()
            state = self._read_state()
            if state.fatal:
                return self._fail(state.fatal, state.exit_code)
        if self.stop.is_set() and not self.pod_done.is_set():
            return 143
        return self._final_code()

    def _final_code(self) -> int:
        """The script's exit code; when it failed or the pod died without saying, the reason from the pod's status."""
        if self.exit_code == 0 and self.state_failed:
            _say("the script succeeded but its state (flare.get_state()) could not be kept: failing this run")
            return 1
        if self.exit_code == 0:
            return 0
        deadline = time.monotonic() + 15
        state = self._read_state()
        while state.exit_code is None and not state.fatal and time.monotonic() < deadline:
            time.sleep(0.5)
            state = self._read_state()
        if state.fatal and not (state.phase == "Gone" and self.exit_code is not None):
            return self._fail(state.fatal, state.exit_code or self.exit_code)
        if self.exit_code is None:
            return self._fail("the connection to the job pod was lost before the script ended", state.exit_code)
        return self.exit_code

    def _pod_to_runner(self, wire: Wire) -> None:
        try:
            while True:
                message = wire.recv()
                op = message["op"]
                if op == "_out":
                    print(str(message.get("line", "")), flush=True)
                elif op == "_exit":
                    self.exit_code = int(message.get("code", 1))
                    return
                elif op == "_state":
                    self._receive_state(wire, message)
                elif op == "result" and "_size" in message:
                    path = str(message.get("path") or "")
                    if path not in self.allowed_results:
                        wire.recv_body(message, None, limit=self.config.max_file_bytes)
                        _say(f"dropped a result file for {path!r}: not the result path of the current task")
                    else:
                        wire.recv_body(message, Path(path), limit=self.config.max_file_bytes)
                    message.pop("_size", None)
                    self.runner.send(message)
                elif op.startswith("_"):
                    if "_size" in message:
                        wire.recv_body(message, None, limit=self.config.max_file_bytes)
                else:
                    message.pop("_size", None)
                    self.runner.send(message)
        except (ChannelClosed, ValueError, OSError) as exc:
            if self.exit_code is None:
                _say(f"connection to the job pod ended: {exc}")
        finally:
            self.pod_done.set()

    def _state_dir(self) -> Path | None:
        folder = os.environ.get("FL_STATE_DIR")
        return Path(folder) if folder else None

    def _receive_state(self, wire: Wire, message: dict[str, Any]) -> None:
        """The pod's state folder at the end of its run replaces the site's (unpacked with the job-archive
        checks beside it first, then swapped in by renames: a failure keeps the previous state)."""
        folder = self._state_dir()
        if message.get("error"):
            _say(str(message["error"]))
            self.state_failed = True
        if "_size" not in message:
            return
        if folder is None:
            wire.recv_body(message, None, limit=self.config.max_state_bytes)
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        archive, staging = folder.with_name(f".{folder.name}.zip"), folder.with_name(f".{folder.name}.incoming")
        previous = folder.with_name(f".{folder.name}.previous")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            wire.recv_body(message, archive, limit=self.config.max_state_bytes)
            extract_zip(archive, staging, max_bytes=self.config.max_state_bytes)
        except JobError as exc:
            _say(f"the job pod's state was not kept: {exc}")
            self.state_failed = True
            shutil.rmtree(staging, ignore_errors=True)
            return
        finally:
            archive.unlink(missing_ok=True)
        shutil.rmtree(previous, ignore_errors=True)
        if folder.exists():
            os.replace(folder, previous)
        os.replace(staging, folder)
        shutil.rmtree(previous, ignore_errors=True)

    def _runner_to_pod(self, wire: Wire) -> None:
        try:
            while True:
                message = self.runner.recv()
                task = message.get("task") if message["op"] == "task" else None
                body = None
                if isinstance(task, dict):
                    self.allowed_results = {str(task.get("result_path"))}
                    body = Path(task["model_path"]) if task.get("model_path") else None
                wire.send(message, body)
        except (ChannelClosed, ValueError, OSError):
            pass


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fl.site.kube_launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the launcher config (JSON)")
    parser.add_argument("--job-dir", type=Path, required=True, help="the job's folder on the site")
    parser.add_argument("--exchange", type=Path, required=True, help="the job's exchange folder on the site")
    parser.add_argument("--pass-env", action="append", default=[], help="an environment variable the script gets")
    parser.add_argument(
        "--distributed", action="store_true", help="the command is torch.distributed.run's: rank 0 connects by socket"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the script's command")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the script's command after --")
    return args


def main(argv: Sequence[str] | None = None, api: PodApi | None = None) -> int:
    """Run one job script in a pod; its exit code (1 with a clear line when the pod could not run)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    fd = os.environ.get("FL_CHANNEL_FD")
    if not fd:
        _say("FL_CHANNEL_FD is not set: this relay is started by an fl site's job runner")
        return 2
    try:
        config = LauncherConfig.load(args.config)
        api = api or KubePodApi(config.kubeconfig)
    except Exception as exc:
        _say(f"cannot start: {exc}")
        return 2
    relay = Relay(config, api, args, LineChannel(socket.socket(fileno=int(fd))))
    relay.stop_on_signals()
    try:
        return relay.run()
    except Exception as exc:
        _say(f"failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        relay.cleanup()


if __name__ == "__main__":
    sys.exit(main())
