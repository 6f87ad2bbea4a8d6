"""The Kubernetes launcher's pure parts: the job pod's manifest, pod status to job outcome, the wire's token."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from fl.channel import ChannelClosed
from fl.site.kube_launch import LauncherConfig, build_pod, delete_stale_pods, pod_state, relay_command
from fl.site.kube_shim import PathMap
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
        token="secret-token",
        owner={"name": "fl-site-site-1-xyz", "uid": "uid-1"},
    )


def test_the_job_pod_requests_the_sites_gpus_and_keeps_its_other_resources() -> None:
    container = _pod()["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"},
    }
    env = {e["name"]: e["value"] for e in container["env"]}
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
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FL_RELAY_ADDRESS"] == "10.0.0.7:41234" and env["FL_RELAY_TOKEN"] == "secret-token"


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


def test_a_starting_site_deletes_the_pods_of_its_earlier_life_by_label() -> None:
    pods = _Pods(["fl-job-site-1-a", "fl-job-site-1-b"])
    release = {"app.kubernetes.io/instance": "fl-a"}
    assert delete_stale_pods(pods, "ns", "site-1", labels=release, log=lambda _: None) == 2  # type: ignore[arg-type]
    assert pods.deleted == ["fl-job-site-1-a", "fl-job-site-1-b"]
    assert pods.selectors == [
        "app.kubernetes.io/instance=fl-a,app.kubernetes.io/managed-by=fl-site-launcher,fl/site=site-1"
    ]


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


def test_the_wire_accepts_only_the_jobs_token() -> None:
    relay_end, pod_end = _pair()
    present_token(Wire(pod_end), "right")
    assert authenticate(relay_end, "right") is not None
    relay_end, pod_end = _pair()
    present_token(Wire(pod_end), "wrong")
    assert authenticate(relay_end, "right") is None
    relay_end, pod_end = _pair()
    pod_end.sendall(b'{"op":"hello"}\n')
    assert authenticate(relay_end, "right") is None


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
