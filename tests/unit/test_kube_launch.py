"""The Kubernetes launcher's pure parts: the job pod's manifest, pod status to job outcome, the wire's token."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from fl.channel import ChannelClosed
from fl.site.kube_launch import (
    LauncherConfig,
    build_pod,
    build_secret,
    delete_stale_pods,
    owner_reference,
    pod_state,
    relay_command,
)
from fl.site.kube_shim import PathMap
from fl.site.kube_shim import main as shim_main
from fl.site.kube_tls import RelayCertificate, RelayRefused, dial
from fl.site.kube_wire import Wire, authenticate, present_token

SETTINGS: dict[str, Any] = {
    "image": "reg.example/fl-site:1.2",
    "namespace": "hospital-a",
    "gpus": 2,
    "gpuResource": "nvidia.com/gpu",
    "resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 9}, "limits": {"memory": "32Gi"}},
    "nodeSelector": {"gpu": "a100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "scans"}}],
    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
    "labels": {"app.kubernetes.io/instance": "fl", "app.kubernetes.io/component": "job"},
    "shmSize": "2Gi",
}


def _pod(**overrides: Any) -> dict[str, Any]:
    config = LauncherConfig.from_dict({**SETTINGS, **overrides})
    return build_pod(
        config,
        name="fl-job-site-1-abc-0001",
        site="site-1",
        job_id="abc12345-job",
        relay_address="10.0.0.7:41234",
        secret="fl-job-site-1-abc-0001",
        owner={"name": "fl-site-site-1-xyz", "uid": "uid-1"},
    )


def test_the_job_pod_requests_the_sites_gpus_and_keeps_its_other_resources() -> None:
    container = _pod()["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"},
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "NVIDIA_VISIBLE_DEVICES" not in env


def test_a_cpu_job_pod_asks_for_no_gpu_and_sees_none() -> None:
    container = _pod(gpus=0)["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]


def test_the_job_pod_carries_the_sites_scheduling_volumes_image_labels_and_owner() -> None:
    pod = _pod()
    spec, meta = pod["spec"], pod["metadata"]
    assert spec["nodeSelector"] == {"gpu": "a100"}
    assert spec["tolerations"] == SETTINGS["tolerations"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"] == SETTINGS["volumes"][0]
    assert volumes["fl-shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    container = spec["containers"][0]
    assert container["image"] == "reg.example/fl-site:1.2"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/data"] == "data" and mounts["/fl-job"] == "fl-job"
    assert meta["labels"]["fl/site"] == "site-1" and meta["labels"]["fl/job"] == "abc12345-job"
    assert meta["labels"]["app.kubernetes.io/component"] == "job"
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "fl-site-site-1-xyz", "uid": "uid-1", "blockOwnerDeletion": False}
    ]
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in container["env"]}
    assert env["FL_RELAY_ADDRESS"] == "10.0.0.7:41234"
    # the token and the pin come from the job's Secret: anyone who can get pods must not read the token
    assert env["FL_RELAY_TOKEN"] == {"secretKeyRef": {"name": "fl-job-site-1-abc-0001", "key": "token"}}
    assert env["FL_RELAY_CERT_SHA256"] == {"secretKeyRef": {"name": "fl-job-site-1-abc-0001", "key": "cert-sha256"}}


def test_the_jobs_secret_holds_the_token_and_the_pin_and_is_labelled_as_its_pod() -> None:
    config = LauncherConfig.from_dict(SETTINGS)
    secret = build_secret(config, name="fl-job-x", site="site-1", job_id="abc12345-job", token="tok", sha256="ab" * 32)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "fl-job-x"
    assert secret["stringData"] == {"token": "tok", "cert-sha256": "ab" * 32}
    assert secret["metadata"]["labels"] == _pod()["metadata"]["labels"]
    pod = {"metadata": {"name": "fl-job-x", "uid": "u-9"}}
    assert owner_reference(pod) == {
        "apiVersion": "v1", "kind": "Pod", "name": "fl-job-x", "uid": "u-9", "blockOwnerDeletion": False
    }  # fmt: skip


def test_bad_launcher_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="unknown keys \\['gpu'\\]"):
        LauncherConfig.from_dict({**SETTINGS, "gpu": 1})
    with pytest.raises(ValueError, match="gpus: -1 must be >= 0"):
        LauncherConfig.from_dict({**SETTINGS, "gpus": -1})
    with pytest.raises(ValueError, match="nodeSelector: 'x' is not a dict"):
        LauncherConfig.from_dict({**SETTINGS, "nodeSelector": "x"})
    with pytest.raises(ValueError, match="'image'"):
        LauncherConfig.from_dict({"gpus": 1})


def _status(**status: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"resources": {"limits": {"memory": "1Gi"}}}]}, "status": status}


def _container(state: dict[str, Any]) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "job", "state": state}]}


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError"])
def test_container_waiting_reasons_that_never_resolve_fail_the_job_with_the_reason(reason: str) -> None:
    state = pod_state(_status(phase="Pending", **_container({"waiting": {"reason": reason, "message": "nope"}})))
    assert state.fatal == f"{reason}: nope"


def test_oom_killed_fails_the_job_naming_the_memory_limit() -> None:
    terminated = {"terminated": {"reason": "OOMKilled", "exitCode": 137}}
    state = pod_state(_status(phase="Failed", **_container(terminated)))
    assert "OOMKilled" in state.fatal and "1Gi" in state.fatal and state.exit_code == 137


def test_unschedulable_is_waiting_with_the_schedulers_message() -> None:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "Insufficient gpu"}
    state = pod_state(_status(phase="Pending", conditions=[condition]))
    assert not state.fatal and not state.running and state.waiting == "Unschedulable: Insufficient gpu"


def test_creating_running_ended_evicted_and_gone_pods() -> None:
    creating = pod_state(_status(phase="Pending", **_container({"waiting": {"reason": "ContainerCreating"}})))
    assert creating.waiting == "ContainerCreating" and not creating.fatal
    assert pod_state(_status(phase="Running", **_container({"running": {}}))).running
    ended = pod_state(_status(phase="Failed", **_container({"terminated": {"exitCode": 3, "reason": "Error"}})))
    assert ended.exit_code == 3 and not ended.fatal
    evicted = pod_state(_status(phase="Failed", reason="Evicted", message="node low on memory"))
    assert evicted.fatal == "Evicted: node low on memory"
    assert "deleted" in pod_state(None).fatal


class _Pods:
    def __init__(self, names: list[str]) -> None:
        self.names, self.deleted, self.selectors = names, [], []  # type: ignore[var-annotated]

    def list(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self.selectors.append(selector)
        return [{"metadata": {"name": n}} for n in self.names]

    def delete(self, namespace: str, name: str) -> None:
        self.deleted.append(name)

    def delete_secrets(self, namespace: str, selector: str) -> None:
        self.selectors.append(selector)
        self.deleted.append("secrets")


def test_a_starting_site_deletes_the_pods_of_its_earlier_life_by_label() -> None:
    pods = _Pods(["fl-job-site-1-a", "fl-job-site-1-b"])
    release = {"app.kubernetes.io/instance": "fl-a"}
    assert delete_stale_pods(pods, "ns", "site-1", labels=release, log=lambda _: None) == 2  # type: ignore[arg-type]
    assert pods.deleted == ["fl-job-site-1-a", "fl-job-site-1-b", "secrets"]
    assert (
        pods.selectors
        == ["app.kubernetes.io/instance=fl-a,app.kubernetes.io/managed-by=fl-site-launcher,fl/site=site-1"] * 2
    )


def test_the_relay_command_wraps_the_script_and_passes_the_env_names_it_is_given(tmp_path: Path) -> None:
    names = ["MY_VAR", "FL_STATE_DIR"]
    command = relay_command(tmp_path / "l.json", tmp_path / "job", tmp_path / "ex", names, ["python", "s.py"])
    assert command[-3:] == ["--", "python", "s.py"]
    passed = [command[i + 1] for i, arg in enumerate(command) if arg == "--pass-env"]
    assert sorted(passed) == sorted(names) and "fl.site.kube_launch" in command


def test_the_shim_maps_site_paths_to_the_pods_and_back() -> None:
    paths = PathMap({"job_dir": "/ws/j1", "exchange": "/ws/j1/exchange", "python": "/site/python"}, Path("/fl-job"))
    assert paths.to_pod("/ws/j1/app/custom/train.py") == "/fl-job/job/app/custom/train.py"
    assert paths.to_pod("/ws/j1/exchange/task-1.safetensors") == "/fl-job/exchange/task-1.safetensors"
    assert paths.to_site("/fl-job/exchange/result-1.safetensors") == "/ws/j1/exchange/result-1.safetensors"
    assert paths.to_pod("/ws/j10/x") == "/ws/j10/x"
    assert paths.to_pod("--epochs") == "--epochs"


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


class _Relay:
    """A relay's listener on loopback: each connection checked with ``authenticate`` in a thread."""

    def __init__(self, token: str = "right") -> None:
        self.certificate = RelayCertificate.generate()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.results: list[tuple[Wire | None, str]] = []
        self.token = token
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        self.results.append(authenticate(sock, self.token, self.certificate.server_context()))

    def result(self) -> tuple[Wire | None, str]:
        self.thread.join(timeout=20)
        self.listener.close()
        return self.results[0]


def test_the_relay_accepts_the_jobs_token_over_tls_to_its_pinned_certificate() -> None:
    relay = _Relay()
    pod = Wire(dial(relay.address, relay.certificate.sha256, timeout=10))
    present_token(pod, "right")
    wire, why = relay.result()
    assert wire is not None and why == ""
    assert isinstance(wire.sock, ssl.SSLSocket) and wire.sock.version() == "TLSv1.3"
    wire.send({"op": "_start"})
    assert pod.recv() == {"op": "_start"}
    wire.close()
    pod.close()


def test_a_wrong_token_is_refused_and_the_pod_is_told_why() -> None:
    relay = _Relay()
    pod = Wire(dial(relay.address, relay.certificate.sha256, timeout=10))
    present_token(pod, "wrong")
    assert relay.result() == (None, "a wrong token")
    refused = pod.recv()
    assert refused["op"] == "_refused" and "a wrong token" in refused["message"]
    with pytest.raises(ChannelClosed):
        pod.recv()
    pod.close()


def test_the_pod_refuses_a_relay_whose_certificate_is_not_the_pinned_one() -> None:
    relay = _Relay()
    other = RelayCertificate.generate().sha256
    with pytest.raises(RelayRefused, match=f"SHA-256 {relay.certificate.sha256}, not the job's pinned {other}"):
        dial(relay.address, other, timeout=10)
    wire, _ = relay.result()
    assert wire is None  # the pod sent nothing: no token reached the wrong peer


def test_a_connection_without_tls_is_refused() -> None:
    relay = _Relay()
    host, port = relay.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b'{"op":"_auth","token":"right"}\n')
        wire, why = relay.result()
    assert wire is None and why.startswith("no TLS handshake"), why


def test_the_shim_exits_saying_why_when_the_relay_is_not_the_pinned_one(monkeypatch, capsys) -> None:
    relay = _Relay()
    monkeypatch.setenv("FL_RELAY_ADDRESS", relay.address)
    monkeypatch.setenv("FL_RELAY_TOKEN", "right")
    monkeypatch.setenv("FL_RELAY_CERT_SHA256", "00" * 32)
    assert shim_main() == 1
    assert "not the job's pinned " + "00" * 32 in capsys.readouterr().out
    relay.result()


def test_the_shim_exits_saying_why_when_the_relay_refuses_its_token(monkeypatch, capsys) -> None:
    relay = _Relay(token="the-jobs")
    monkeypatch.setenv("FL_RELAY_ADDRESS", relay.address)
    monkeypatch.setenv("FL_RELAY_TOKEN", "another-jobs")
    monkeypatch.setenv("FL_RELAY_CERT_SHA256", relay.certificate.sha256)
    assert shim_main() == 1
    assert "the relay refused this pod: a wrong token" in capsys.readouterr().out
    assert relay.result() == (None, "a wrong token")


def _send_ignoring_a_closed_peer(wire: Wire, body: Path) -> None:
    with contextlib.suppress(ChannelClosed):
        wire.send({"op": "task"}, body)


def test_a_file_body_travels_after_its_message_and_is_bounded(tmp_path: Path) -> None:
    a, b = _pair()
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"x" * 300_000)
    sender = threading.Thread(target=lambda: Wire(a).send({"op": "task"}, source))
    sender.start()
    wire = Wire(b)
    message = wire.recv()
    assert message["_size"] == 300_000
    wire.recv_body(message, tmp_path / "copy", limit=1 << 20)
    sender.join()
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    a2, b2 = _pair()
    threading.Thread(target=_send_ignoring_a_closed_peer, args=(Wire(a2), source)).start()
    wire2 = Wire(b2)
    with pytest.raises(ValueError, match="exceeds the limit"):
        wire2.recv_body(wire2.recv(), tmp_path / "big", limit=1000)
    assert not (tmp_path / "big").exists()
    b2.close()
    a2.close()
