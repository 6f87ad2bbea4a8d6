"""A tiny in-process fake of the Kubernetes pod API, whose "pods" run as local processes.

It serves the few endpoints fl's Kubernetes launcher calls (create, read, delete, list by label,
log) over HTTP on 127.0.0.1, so that the real ``kubernetes`` client, the relay and the shim are
exercised without a cluster. A pod runs its container's command with its env; the emptyDir at
FL_JOB_ROOT becomes a temporary folder. ``gpus`` is the node's nvidia.com/gpu capacity: a pod that
asks for more than is free stays Pending (Unschedulable) until another ends. An image named
``missing/...`` fails with ErrImagePull.
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

    def start(self) -> None:
        env = dict(os.environ)
        env.update({e["name"]: e.get("value", "") for e in self.container.get("env", [])})
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
                        used += pod.gpus()
                        pod.start()

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

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.created.append(body)
                    fake.pods[body["metadata"]["name"]] = FakePod(body)
                self._send(201, body)

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

            def do_DELETE(self) -> None:
                parts, _ = self._parts()
                with fake.lock:
                    pod = fake.pods.pop(parts[5], None)
                if pod is None:
                    self._missing()
                    return
                pod.kill()
                self._send(200, self._pod_json(pod))  # as the real API: the deleted pod

        return Handler
