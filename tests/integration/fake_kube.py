"""A tiny in-process fake of the Kubernetes pod API, whose "pods" run as local processes.

It serves the few endpoints fl's Kubernetes launcher calls (create, read, delete, list by label,
log) over HTTP on 127.0.0.1, so that the real ``kubernetes`` client, the relay and the shim are
exercised without a cluster. A pod runs its container's command with its env; the emptyDir at
FL_JOB_ROOT becomes a temporary folder. ``gpus`` is the node's nvidia.com/gpu capacity: a pod that
asks for more than is free stays Pending (Unschedulable) until another ends. An image named
``missing/...`` fails with ErrImagePull. Secrets are kept (create, JSON-patch, delete, deletecollection by label), a
pod's ``secretKeyRef`` variables are read from them when it starts (a missing one is
CreateContainerConfigError, as the kubelet's), and deleting a pod deletes the Secrets it owns (the
garbage collector's part).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


def _matches(obj: dict[str, Any], wanted: dict[str, str]) -> bool:
    return all(obj["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())


class FakePod:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.process: subprocess.Popen[bytes] | None = None
        self.log = bytearray()
        self.status: dict[str, Any] = {"phase": "Pending"}
        self.root = tempfile.mkdtemp(prefix="fake-pod-")

    @property
    def container(self) -> dict[str, Any]:
        return dict(self.body["spec"]["containers"][0])

    def gpus(self) -> int:
        return int((self.container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", "0"))

    def start(self, secrets: dict[str, dict[str, Any]]) -> None:
        env = dict(os.environ)
        for e in self.container.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[e["name"]] = e.get("value", "")
                continue
            data = (secrets.get(ref["name"]) or {}).get("stringData") or {}
            if ref["key"] not in data:
                waiting = {"reason": "CreateContainerConfigError", "message": f'secret "{ref["name"]}" not found'}
                self.status = {"phase": "Pending", "containerStatuses": [{"state": {"waiting": waiting}}]}
                return
            env[e["name"]] = data[ref["key"]]
        env["FL_JOB_ROOT"] = self.root
        self.process = subprocess.Popen(
            self.container["command"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.status = {"phase": "Running", "containerStatuses": [{"name": "job", "state": {"running": {}}}]}
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for chunk in iter(self.process.stdout.readline, b""):
            self.log += chunk
        code = self.process.wait()
        code = code if code >= 0 else 128 - code
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        self.status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "job", "state": {"terminated": terminated}}],
        }

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class FakeKube:
    """The fake API server: ``pods`` by name, every pod ever created in ``created``."""

    def __init__(self, root: Path, *, gpus: int = 0, namespace: str = "fl") -> None:
        self.gpus = gpus
        self.namespace = namespace
        self.pods: dict[str, FakePod] = {}
        self.created: list[dict[str, Any]] = []
        self.secrets: dict[str, dict[str, Any]] = {}
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.kubeconfig = root / "fake-kubeconfig"
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": url}}],
                    "users": [{"name": "fake", "user": {"token": "fake"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        self._stop = threading.Event()
        threading.Thread(target=self._schedule_loop, daemon=True).start()

    def add_stale_pod(self, body: dict[str, Any]) -> None:
        """A pod object as an earlier site run would have left it (not running)."""
        with self.lock:
            pod = FakePod(body)
            pod.status = {"phase": "Failed"}
            self.pods[body["metadata"]["name"]] = pod

    def _schedule_loop(self) -> None:
        while not self._stop.wait(0.2):
            with self.lock:
                used = sum(p.gpus() for p in self.pods.values() if p.running())
                for pod in self.pods.values():
                    if pod.process is not None or pod.status.get("phase") != "Pending":
                        continue
                    if pod.container["image"].startswith("missing/"):
                        waiting = {"reason": "ErrImagePull", "message": f"image {pod.container['image']} not found"}
                        pod.status = {"phase": "Pending", "containerStatuses": [{"state": {"waiting": waiting}}]}
                    elif used + pod.gpus() > self.gpus and pod.gpus() > 0:
                        message = f"0/1 nodes are available: 1 Insufficient nvidia.com/gpu (capacity {self.gpus})."
                        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                        pod.status = {"phase": "Pending", "conditions": [{**condition, "message": message}]}
                    else:
                        pod.start(self.secrets)
                        used += pod.gpus() if pod.process is not None else 0

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        with self.lock:
            for pod in list(self.pods.values()):
                pod.kill()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any, *, text: bool = False) -> None:
                data = body if text else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _parts(self) -> tuple[list[str], dict[str, list[str]]]:
                url = urlparse(self.path)
                return url.path.strip("/").split("/"), parse_qs(url.query)

            def _pod_json(self, pod: FakePod) -> dict[str, Any]:
                # the client's models require these fields of every container status
                statuses = [
                    {
                        "name": "job",
                        "image": pod.container["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        **cs,
                    }
                    for cs in pod.status.get("containerStatuses", [])
                ]
                return {**pod.body, "status": {**pod.status, "containerStatuses": statuses}}

            def _missing(self) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

            def _body(self) -> Any:
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_POST(self) -> None:
                parts, _ = self._parts()
                body = self._body()
                if parts[-1] == "secrets":
                    with fake.lock:
                        fake.secrets[body["metadata"]["name"]] = body
                    self._send(201, body)
                    return
                body["metadata"]["uid"] = f"uid-{body['metadata']['name']}"
                with fake.lock:
                    fake.created.append(body)
                    fake.pods[body["metadata"]["name"]] = FakePod(body)
                self._send(201, body)

            def do_PATCH(self) -> None:  # a JSON patch of a Secret's metadata (what the launcher sends)
                parts, _ = self._parts()
                with fake.lock:
                    secret = fake.secrets.get(parts[5])
                    if secret is None or parts[4] != "secrets":
                        self._missing()
                        return
                    for op in self._body():
                        assert op["op"] == "add" and op["path"].startswith("/metadata/"), op
                        secret["metadata"][op["path"].split("/")[-1]] = op["value"]
                self._send(200, secret)

            def do_GET(self) -> None:
                parts, query = self._parts()
                with fake.lock:
                    if len(parts) == 5:  # api/v1/namespaces/NS/pods?labelSelector=
                        wanted = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                        items = [
                            self._pod_json(p)
                            for p in fake.pods.values()
                            if all(p.body["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
                        ]
                        self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                        return
                    pod = fake.pods.get(parts[5])
                    if pod is None:
                        self._missing()
                    elif len(parts) == 7 and parts[6] == "log":
                        lines = bytes(pod.log).splitlines(keepends=True)
                        tail = int(query.get("tailLines", ["0"])[0]) or len(lines)
                        self._send(200, b"".join(lines[-tail:]), text=True)
                    else:
                        self._send(200, self._pod_json(pod))

            def _delete_secrets(self, parts: list[str], query: dict[str, list[str]]) -> None:
                """One by name, or (deletecollection) those matching the label selector."""
                with fake.lock:
                    if len(parts) == 6:
                        names = [parts[5]] if parts[5] in fake.secrets else []
                    else:
                        wanted = dict(kv.split("=", 1) for kv in query["labelSelector"][0].split(",") if kv)
                        names = [n for n, s in fake.secrets.items() if _matches(s, wanted)]
                    gone = [fake.secrets.pop(n) for n in names]
                if len(parts) == 6 and not gone:
                    self._missing()
                    return
                self._send(
                    200, gone[0] if len(parts) == 6 else {"kind": "SecretList", "apiVersion": "v1", "items": gone}
                )

            def do_DELETE(self) -> None:
                parts, query = self._parts()
                if parts[4] == "secrets":
                    self._delete_secrets(parts, query)
                    return
                with fake.lock:
                    pod = fake.pods.pop(parts[5], None)
                    if pod is not None:  # the garbage collector: what the pod owned goes with it
                        uid = pod.body["metadata"].get("uid")
                        for name, secret in list(fake.secrets.items()):
                            if any(o.get("uid") == uid for o in secret["metadata"].get("ownerReferences") or []):
                                del fake.secrets[name]
                if pod is None:
                    self._missing()
                    return
                pod.kill()
                self._send(200, self._pod_json(pod))  # as the real API: the deleted pod

        return Handler
