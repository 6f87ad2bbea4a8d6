"""Tiny programs for the local-cluster smoke test (standard library only).

python3 /app/smoke_app.py serve PORT              TCP echo server
python3 /app/smoke_app.py call HOST PORT [TRIES]  exits 0 once HOST:PORT echoes a message back
python3 /app/smoke_app.py api                     the API server, from a pod, by its Service DNS name,
                                                  with the service-account token and CA
"""

import json
import pathlib
import socket
import socketserver
import ssl
import sys
import time
import urllib.request


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


def serve(port: int) -> None:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Echo) as srv:
        print(f"echo server on :{port}", flush=True)
        srv.serve_forever()


def call(host: str, port: int, tries: int) -> int:
    msg = f"hello from {socket.gethostname()}\n".encode()
    for i in range(tries):
        try:
            addr = socket.gethostbyname(host)
            with socket.create_connection((addr, port), timeout=5) as s:
                s.sendall(msg)
                reply = s.makefile("rb").readline()
            if reply == msg:
                print(f"ok: {host} ({addr}):{port} echoed {reply!r}", flush=True)
                return 0
            print(f"try {i}: unexpected reply {reply!r}", flush=True)
        except OSError as e:
            print(f"try {i}: {host}:{port}: {e}", flush=True)
        time.sleep(2)
    return 1


def api() -> int:
    sa = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
    token = (sa / "token").read_text().strip()
    namespace = (sa / "namespace").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(sa / "ca.crt"))
    url = "https://kubernetes.default.svc.cluster.local/version"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        version = json.load(r)["gitVersion"]
    print(f"ok: {url} says {version} (pod in namespace {namespace})", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "api":
        sys.exit(api())
    else:
        sys.exit(call(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 30))
