"""The chart's wiring, run for real: every pod of `helm template charts/fl` as a process on a host of
its own (a network namespace), talking over real TCP with the chart's certificates.

The test renders the chart, takes each container's command, arguments and environment, the TLS
Secrets the chart generated and the Service's name and port, and runs them: the server, the two
sites and the submit hook (wait for the server, export hello-pt, `fl submit --wait`), each in its
own network namespace joined by veth pairs to a bridge namespace. The Service name resolves, as in
a cluster, to the server's address (through ``ip netns exec``'s per-namespace /etc/hosts). So the
ports, names, certificates (SANs, roles) and arguments of the chart are proven, not only its syntax.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools import tool_path

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.231.{}.{}"
pytestmark = pytest.mark.timeout(900)


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if tool_path("helm") is None:
        return "helm not found (bash tools/install-tools.sh installs it)"
    try:
        import yaml  # noqa: F401
    except ImportError:
        return "pyyaml is not installed (the test extra)"
    return None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)


class Hosts:
    """Network namespaces on a private bridge, each with an address and an /etc/hosts of its own."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.octet = 100 + int(self.tag, 16) % 100
        self.bridge_ns = f"flmh-br-{self.tag}"
        self.namespaces: list[str] = []
        self.addresses: dict[str, str] = {}
        _run("ip", "netns", "add", self.bridge_ns)
        self.namespaces.append(self.bridge_ns)
        _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")

    def add(self, name: str, host: int) -> str:
        ns = f"flmh-{name}-{self.tag}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        outside, inside = f"v{self.tag}{host}", f"p{self.tag}{host}"
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", outside, "netns", self.bridge_ns)
        _run("ip", "link", "set", inside, "netns", ns)
        _run("ip", "-n", self.bridge_ns, "link", "set", outside, "master", "br0", "up")
        address = SUBNET.format(self.octet, host)
        _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _run("ip", "-n", ns, "link", "set", inside, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        self.addresses[name] = address
        return ns

    def hosts_file(self, ns: str, names: dict[str, str]) -> None:
        folder = Path("/etc/netns") / ns
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{address} {name}" for name, address in names.items()]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    why_not = _requirements()
    if why_not:
        pytest.skip(why_not)
    h = Hosts()
    yield h
    h.close()


def _render(*sets: str) -> list[dict[str, Any]]:
    import yaml

    helm = tool_path("helm")
    assert helm is not None
    command = [helm, "template", "fl", str(REPO / "charts" / "fl"), "-f", str(REPO / "charts/fl/ci/cpu-values.yaml")]
    for item in sets:
        command += ["--set", item]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _object(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


class Pod:
    """One pod of the rendered chart, its mounts mapped onto folders of this machine."""

    def __init__(self, name: str, spec: dict[str, Any], docs: list[dict[str, Any]], root: Path, ns: str) -> None:
        self.name = name
        self.spec = spec
        self.root = root / name
        self.ns = ns
        self.mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            for mount in container.get("volumeMounts", []):
                local = self.root / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                self.mounts[mount["mountPath"]] = local
                secret = volumes[mount["name"]].get("secret")
                if secret:  # the chart's own TLS material, as the kubelet would mount it
                    data = _object(docs, "Secret", secret["secretName"])["data"]
                    for key, value in data.items():
                        if key != "ca.key":
                            (local / key).write_bytes(base64.b64decode(value))
                    (local / "tls.key").chmod(0o600)

    def local(self, text: str) -> str:
        """Paths of the pod's filesystem, in ``text``, as the folders that stand in for them here."""
        places = {**{k: str(v) for k, v in self.mounts.items()}, "/opt/fl/jobs": str(REPO / "jobs")}
        pattern = "|".join(re.escape(p) for p in sorted(places, key=len, reverse=True))
        return re.sub(rf"(?<![\w/])({pattern})(?=/|\s|$|[^\w])", lambda m: places[m.group(1)], text)

    def command(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        # No command: the image's entrypoint, `tini -- fl` (images/*/Dockerfile).
        argv = list(container.get("command") or ["fl"]) + list(container.get("args") or [])
        argv = [self.local(a) for a in argv]
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        env["PYTHONUNBUFFERED"] = "1"
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self.local(str(item["value"]))
        if argv[0] in ("fl", "python"):
            argv = [sys.executable, "-m", "fl", *argv[1:]] if argv[0] == "fl" else [sys.executable, *argv[1:]]
        return ["ip", "netns", "exec", self.ns, *argv], env


def test_the_rendered_chart_runs_hello_pt_across_hosts(hosts: Hosts, tmp_path: Path) -> None:
    docs = _render("job.trainSize=64", "job.testSize=64", "job.wait=true")  # the hook waits: the job must finish
    service = _object(docs, "Service", "fl-server")
    port = service["spec"]["ports"][0]["port"]
    service_name = "fl-server.default.svc.cluster.local"

    layout = {"server": 10, "site-1": 11, "site-2": 12, "submit": 13}
    namespaces = {name: hosts.add(name, host) for name, host in layout.items()}
    for ns in namespaces.values():
        hosts.hosts_file(ns, {f"{service_name} fl-server": hosts.addresses["server"]})

    pods = {
        "server": Pod("server", _object(docs, "Deployment", "fl-server")["spec"]["template"]["spec"], docs, tmp_path,
                      namespaces["server"]),
        "site-1": Pod("site-1", _object(docs, "Deployment", "fl-site-site-1")["spec"]["template"]["spec"], docs,
                      tmp_path, namespaces["site-1"]),
        "site-2": Pod("site-2", _object(docs, "Deployment", "fl-site-site-2")["spec"]["template"]["spec"], docs,
                      tmp_path, namespaces["site-2"]),
        "submit": Pod("submit", _object(docs, "Job", "fl-submit")["spec"]["template"]["spec"], docs, tmp_path,
                      namespaces["submit"]),
    }  # fmt: skip
    server_args = pods["server"].spec["containers"][0]["args"]
    assert server_args[server_args.index("--port") + 1] == str(port), "the Service's port is the server's --port"

    processes: list[subprocess.Popen[bytes]] = []
    logs: dict[str, Path] = {}
    try:
        for name in ("server", "site-1", "site-2"):
            argv, env = pods[name].command(pods[name].spec["containers"][0])
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as out:
                processes.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
        started = time.monotonic()
        while "listening" not in logs["server"].read_text():
            assert processes[0].poll() is None, f"the server exited:\n{logs['server'].read_text()[-3000:]}"
            assert time.monotonic() - started < 120, "the server did not start listening within 120 s"
            time.sleep(0.2)
        # The submit hook, container by container, as the Job runs them.
        submit = pods["submit"]
        for container in submit.spec.get("initContainers", []) + submit.spec["containers"]:
            argv, env = submit.command(container)
            started = time.monotonic()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (
                f"submit hook container {container['name']} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                f"{proc.stderr[-2000:]}\nserver log:\n{logs['server'].read_text()[-2000:]}"
            )
            print(f"[multihost] {container['name']}: {time.monotonic() - started:.1f} s")
        assert "finished" in proc.stdout, proc.stdout
        for site in ("site-1", "site-2"):
            log = logs[site].read_text()
            assert f"{site}: round 2/2" in log, log[-3000:]
            assert f"registered with {service_name}:{port}" in log
        assert "mutual TLS" in logs["server"].read_text()
        # Traffic crossed hosts: the sites reached the server's own address, not loopback.
        assert hosts.addresses["server"] != "127.0.0.1"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for name, path in logs.items():
            print(f"--- {name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))


def test_hosts_fixture_cleans_up(hosts: Hosts) -> None:
    ns = hosts.add("probe", 20)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns in listed
    hosts.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns not in listed and shlex.quote(hosts.bridge_ns) not in listed
