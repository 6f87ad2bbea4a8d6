"""Loopback TCP ceiling: the time to copy N bytes through 127.0.0.1 with a plain socket.

A sender process ``sendall``s N bytes from one preallocated buffer, in large slices; a receiver
process ``recv_into``s a preallocated buffer until it has N bytes, then answers one byte.  The
time runs from the sender's first byte to the receiver's answer (so it covers every byte
delivered), best of ``--repeat`` runs.  SO_SNDBUF/SO_RCVBUF are 1 MiB (``--sock-buf-kib``; on
this machine 1 MiB beat both the kernel's autotuning and 4-16 MiB).

This is the ceiling any framework's model transfer on this machine can approach, reported
beside the large scenario's effective GB/s.

    python -m bench.loopback [--mib 1024] [--repeat 5] [--sock-buf-kib 1024]     # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time
from typing import Any

MiB = 1024**2
CHUNK = 16 * MiB


def _receiver(port_q: Any, nbytes: int, repeat: int, sock_buf: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock_buf:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    buf = bytearray(min(nbytes, 64 * MiB))
    view = memoryview(buf)
    for _ in range(repeat):
        conn, _ = srv.accept()
        if sock_buf:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[: min(len(buf), nbytes - got)])
            if n == 0:
                raise RuntimeError("sender closed early")
            got += n
        conn.sendall(b"k")
        conn.close()
    srv.close()


def measure(nbytes: int, repeat: int = 5, sock_buf: int = MiB) -> dict[str, Any]:
    """Copy ``nbytes`` ``repeat`` times; ``sock_buf`` > 0 sets SO_SNDBUF/SO_RCVBUF (0: kernel autotuning)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rx = ctx.Process(target=_receiver, args=(q, nbytes, repeat, sock_buf), daemon=True)
    rx.start()
    try:
        port = q.get(timeout=60)
        data = memoryview(bytearray(b"\x01") * min(nbytes, 64 * MiB))
        times = []
        for _ in range(repeat):
            s = socket.create_connection(("127.0.0.1", port))
            if sock_buf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock_buf)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            sent = 0
            while sent < nbytes:
                n = min(CHUNK, nbytes - sent, len(data))
                s.sendall(data[:n])
                sent += n
            if s.recv(1) != b"k":
                raise RuntimeError("no answer from the receiver")
            times.append(time.perf_counter() - t0)
            s.close()
        rx.join(timeout=60)
    finally:
        if rx.is_alive():
            rx.kill()
            rx.join()
    best = min(times)
    return {
        "bytes": nbytes,
        "seconds_best": round(best, 4),
        "seconds_all": [round(t, 4) for t in times],
        "gb_per_s": round(nbytes / best / 1e9, 3),
        "gib_per_s": round(nbytes / best / 1024**3, 3),
        "method": "plain TCP over 127.0.0.1: one sender process (sendall, 16 MiB slices), one receiver "
        "process (recv_into a 64 MiB buffer), "
        + (f"SO_SNDBUF/SO_RCVBUF {sock_buf // 1024} KiB" if sock_buf else "kernel socket-buffer autotuning")
        + f"; best of {repeat}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="MiB to copy per repeat (default 1024)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--sock-buf-kib",
        type=int,
        default=1024,
        help="SO_SNDBUF/SO_RCVBUF in KiB (default 1024, the fastest here); 0: kernel autotuning",
    )
    a = ap.parse_args(argv)
    print(json.dumps({"scenario": "loopback", **measure(a.mib * MiB, a.repeat, a.sock_buf_kib * 1024)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
