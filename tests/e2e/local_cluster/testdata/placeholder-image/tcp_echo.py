"""Tiny TCP echo server / client for the local-cluster smoke test.

python3 /app/tcp_echo.py serve PORT
python3 /app/tcp_echo.py call HOST PORT [TRIES]   # exits 0 once HOST:PORT echoes a message back
"""

import socket
import socketserver
import sys
import time


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


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit(call(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 30))
