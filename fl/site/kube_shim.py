"""The job pod's side of the Kubernetes launcher: dial the site's relay, run the job's script, relay for it.

The pod cannot share the site's socketpair or its exchange folder, so this shim stands in for the
site: it connects to ``FL_RELAY_ADDRESS`` over TLS, accepting only the certificate whose SHA-256 is
``FL_RELAY_CERT_SHA256`` (:mod:`fl.site.kube_tls`), presents ``FL_RELAY_TOKEN`` (:mod:`fl.site.kube_wire`;
both variables come from the job's Secret),
receives the script's command, environment and the job's app, unpacks the app under
``FL_JOB_ROOT`` (checked like any job archive), starts the script with a socketpair of its own, and
carries its LineChannel messages and model/result files over the connection, with the site's paths
mapped to this pod's. The script's output goes to the pod's log and to the relay. The shim exits
with the script's exit code; if the relay goes away it stops the script and exits 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl.channel import ChannelClosed, ChannelListener, LineChannel
from fl.server.jobstore import extract_zip
from fl.site.fork_server import ForkedScript
from fl.site.kube_tls import RelayRefused, dial
from fl.site.kube_wire import Wire, present_token, zip_state
from fl.site.script_process import start_script, stop_group

__all__ = ["PathMap", "main"]

MAX_FILE_BYTES = 64 * 2**30


class PathMap:
    """Site paths (the job folder, the exchange folder, the site's python) to this pod's, and back."""

    def __init__(self, start: Mapping[str, Any], root: Path) -> None:
        # the exchange folder first: it may lie inside the job folder
        self.pairs = [(str(start["exchange"]), str(root / "exchange")), (str(start["job_dir"]), str(root / "job"))]
        self.python = str(start.get("python") or "")

    def to_pod(self, value: str) -> str:
        if self.python and value == self.python:
            return sys.executable
        return self._swap(value, 0, 1)

    def to_site(self, value: str) -> str:
        return self._swap(value, 1, 0)

    def _swap(self, value: str, src: int, dst: int) -> str:
        for pair in self.pairs:
            if value == pair[src] or value.startswith(pair[src] + "/"):
                return pair[dst] + value[len(pair[src]) :]
        return value


class Shim:
    """One script run in this pod, relayed to the site."""

    def __init__(self, wire: Wire, root: Path) -> None:
        self.wire = wire
        self.root = root
        self.process: subprocess.Popen[bytes] | ForkedScript | None = None
        #: This pod's copy of the job's state folder (flare.get_state()), relayed back at the end; its size limit.
        self.state_dir: Path | None = None
        self.state_limit = 0
        self.output_done = threading.Event()

    def run(self) -> int:
        try:
            start = self.wire.recv()
        except ChannelClosed:
            raise RelayRefused("the relay closed the connection before starting the job (refused this pod?)") from None
        if start["op"] == "_refused":
            raise RelayRefused(str(start.get("message") or "the relay refused this pod"))
        if start["op"] != "_start":
            raise ValueError(f"expected _start from the relay, got {start['op']!r}")
        paths = PathMap(start, self.root)
        app = self.wire.recv()
        archive = self.root / "app.zip"
        self.wire.recv_body(app, archive, limit=MAX_FILE_BYTES)
        extract_zip(archive, Path(paths.to_pod(str(Path(start["job_dir"]) / "app"))))
        archive.unlink()
        self._receive_state(start, paths)
        Path(paths.to_pod(str(start["exchange"]))).mkdir(parents=True, exist_ok=True)
        command = [paths.to_pod(str(a)) for a in start["command"]]
        env = dict(os.environ)
        for key in ("FL_RELAY_TOKEN", "FL_RELAY_ADDRESS", "FL_RELAY_CERT_SHA256"):
            env.pop(key, None)
        for key, value in dict(start.get("env") or {}).items():
            env[str(key)] = os.pathsep.join(paths.to_pod(p) for p in str(value).split(os.pathsep))
        started = start_script(
            command,
            distributed=bool(start.get("distributed")),  # torchrun's ranks: rank 0 connects to a socket here
            channel_dir=self.root,
            cwd=paths.to_pod(str(start["job_dir"])),
            env=env,
        )
        self.process = started.process
        threading.Thread(target=self._pump_output, daemon=True).start()
        args = (started.parent, started.listener, paths)
        threading.Thread(target=self._serve_script, args=args, daemon=True).start()
        code = self.process.wait()
        self.output_done.wait(10)
        self.stop_script()
        self._send_state()
        self.wire.send({"op": "_exit", "code": code if code >= 0 else 128 - code})
        return code if code >= 0 else 128 - code

    def _receive_state(self, start: Mapping[str, Any], paths: PathMap) -> None:
        """The site's state folder for this job, unpacked where the script's FL_STATE_DIR points in this pod."""
        message = self.wire.recv()
        if message["op"] != "_state":
            raise ValueError(f"expected _state from the relay, got {message['op']!r}")
        self.state_limit = int(start.get("state_limit") or 0)
        self.state_dir = Path(paths.to_pod(str(start["state_dir"]))) if start.get("state_dir") else None
        if "_size" not in message:
            return
        archive = self.root / "state.zip"
        self.wire.recv_body(message, archive if self.state_dir else None, limit=self.state_limit)
        if self.state_dir is not None:
            extract_zip(archive, self.state_dir, max_bytes=self.state_limit)
            archive.unlink()

    def _send_state(self) -> None:
        """This pod's state folder back to the site (none: nothing to keep), or why it cannot go."""
        archive = self.root / "state-out.zip"
        size = zip_state(self.state_dir, archive)
        if size is None:
            self.wire.send({"op": "_state"})
            return
        if size > self.state_limit:
            error = (
                f"the job pod's state (flare.get_state(), {size} bytes zipped) exceeds the site's maxStateBytes "
                f"({self.state_limit}): not kept"
            )
            print(f"fl kube shim: {error}", flush=True)
            self.wire.send({"op": "_state", "error": error})
        else:
            self.wire.send({"op": "_state"}, archive)
        archive.unlink()

    def stop_script(self) -> None:
        """SIGTERM, then SIGKILL, to the script's process group (what it started too)."""
        process = self.process
        if process is None:
            return
        stop_group(process)

    def _pump_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        try:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                print(line, flush=True)  # the pod's log (kubectl logs)
                self.wire.send({"op": "_out", "line": line})
        except (ChannelClosed, ValueError):
            pass
        finally:
            self.output_done.set()

    def _serve_script(self, parent: socket.socket | None, listener: ChannelListener | None, paths: PathMap) -> None:
        """Relay for the script on its socketpair, or (torchrun ranks) on rank 0's connection to ``listener``."""
        first: dict[str, Any] | None = None
        if parent is not None:
            script = LineChannel(parent)
        else:
            assert listener is not None
            process = self.process
            accepted = listener.accept(lambda: process is not None and process.poll() is None)
            if accepted is None:
                return
            script, first = accepted
            first.pop("token", None)  # this pod's secret, not the site's business
            print(f"fl kube shim: training script connected: rank {first.get('rank')}", flush=True)
        threading.Thread(target=self._site_to_script, args=(script, paths), daemon=True).start()
        self._script_to_site(script, paths, first)

    def _script_to_site(self, script: LineChannel, paths: PathMap, first: dict[str, Any] | None = None) -> None:
        try:
            while True:
                message, first = (first, None) if first is not None else (script.recv(), None)
                body = None
                if message["op"] == "result" and message.get("path"):
                    body = Path(str(message["path"]))
                    message["path"] = paths.to_site(str(body))
                self.wire.send(message, body if body is not None and body.is_file() else None)
                if body is not None:
                    body.unlink(missing_ok=True)
        except (ChannelClosed, ValueError):
            pass

    def _site_to_script(self, script: LineChannel, paths: PathMap) -> None:
        try:
            while True:
                message = self.wire.recv()
                task = message.get("task") if message["op"] == "task" else None
                if isinstance(task, dict):
                    for key in ("model_path", "result_path"):
                        if task.get(key):
                            task[key] = paths.to_pod(str(task[key]))
                dest = Path(task["model_path"]) if isinstance(task, dict) and task.get("model_path") else None
                if "_size" in message:
                    self.wire.recv_body(message, dest, limit=MAX_FILE_BYTES)
                    message.pop("_size")
                script.send(message)
        except (ChannelClosed, ValueError, OSError):
            self.stop_script()  # the site went away: the job is over here too


def main() -> int:
    """Connect to the relay named in the environment and run the job's script; its exit code."""
    address, token = os.environ.get("FL_RELAY_ADDRESS", ""), os.environ.get("FL_RELAY_TOKEN", "")
    pinned = os.environ.get("FL_RELAY_CERT_SHA256", "")
    root = Path(os.environ.get("FL_JOB_ROOT") or "/fl-job")
    if not address or not token or not pinned:
        print(
            "fl kube shim: FL_RELAY_ADDRESS, FL_RELAY_TOKEN and FL_RELAY_CERT_SHA256 must be set "
            "(this runs in a job pod, with its job's Secret)",
            flush=True,
        )
        return 2
    try:
        wire = Wire(dial(address, pinned))
    except (RelayRefused, OSError) as exc:
        print(f"fl kube shim: {exc}", flush=True)
        return 1
    present_token(wire, token)
    shim = Shim(wire, root)
    signal.signal(signal.SIGTERM, lambda *_: shim.stop_script())
    try:
        return shim.run()
    except RelayRefused as exc:
        print(f"fl kube shim: {exc}", flush=True)
        return 1
    except (ChannelClosed, ValueError, OSError) as exc:
        print(f"fl kube shim: {type(exc).__name__}: {exc}", flush=True)
        shim.stop_script()
        return 1
    finally:
        wire.close()


if __name__ == "__main__":
    sys.exit(main())
