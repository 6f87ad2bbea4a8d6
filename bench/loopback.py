"""The loopback floor: the time to copy N bytes through 127.0.0.1 with a plain socket.

A sender process ``sendall``s N bytes from one preallocated buffer, in large slices; a receiver
process receives them into **fresh memory** (a new buffer of N bytes per run, as a framework
receives a model into a new allocation: the page faults are part of the copy), then
answers one byte.  The time runs from the sender's first byte to the receiver's answer (so it
covers every byte delivered); the figure is the **median** of ``--repeat`` runs (best and all
runs reported too).  ``--reuse`` receives into one reused 64 MiB buffer instead (the old
ceiling).  SO_SNDBUF/SO_RCVBUF are 1 MiB (``--sock-buf-kib``; on this machine 1 MiB beat both
the kernel's autotuning and 4-16 MiB).

No framework's model transfer on this machine can be faster: bench/run.py measures it in the
same run as the large scenario, right before it, at the model's size.

    python -m bench.loopback [--mib 1024] [--repeat 5] [--reuse] [--sock-buf-kib 1024]   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from typing import Any

MiB = 1024**2
CHUNK = 16 * MiB


def _receiver(port_q: Any, nbytes: int, repeat: int, sock_buf: int, fresh: bool) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock_buf:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    reused = None if fresh else memoryview(bytearray(min(nbytes, 64 * MiB)))
    for _ in range(repeat):
        conn, _ = srv.accept()
        if sock_buf:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)
        # a new buffer per run, as a framework allocates each received model (large: fresh pages from mmap)
        fresh_map = bytearray(nbytes) if fresh else None
        view = memoryview(fresh_map) if fresh_map is not None else reused
        assert view is not None
        got = 0
        while got < nbytes:
            if fresh_map is not None:
                n = conn.recv_into(view[got : min(nbytes, got + CHUNK)])
            else:
                n = conn.recv_into(view[: min(len(view), nbytes - got)])
            if n == 0:
                raise RuntimeError("sender closed early")
            got += n
        conn.sendall(b"k")
        conn.close()
        if fresh_map is not None:
            view.release()
            del fresh_map
    srv.close()


def measure(nbytes: int, repeat: int = 5, sock_buf: int = MiB, fresh: bool = True) -> dict[str, Any]:
    """Copy ``nbytes`` ``repeat`` times, into fresh memory each time unless ``fresh`` is false; the
    figure is the median. ``sock_buf`` > 0 sets SO_SNDBUF/SO_RCVBUF (0: kernel autotuning)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rx = ctx.Process(target=_receiver, args=(q, nbytes, repeat, sock_buf, fresh), daemon=True)
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
    median = statistics.median(times)
    into = "into fresh memory (a new buffer each run)" if fresh else "into one reused 64 MiB buffer"
    return {
        "bytes": nbytes,
        "seconds_median": round(median, 4),
        "seconds_best": round(best, 4),
        "seconds_all": [round(t, 4) for t in times],
        "gb_per_s": round(nbytes / median / 1e9, 3),
        "gib_per_s": round(nbytes / median / 1024**3, 3),
        "gb_per_s_best": round(nbytes / best / 1e9, 3),
        "fresh_memory": fresh,
        "method": "plain TCP over 127.0.0.1: one sender process (sendall, 16 MiB slices), one receiver "
        f"process (recv_into, {into}), "
        + (f"SO_SNDBUF/SO_RCVBUF {sock_buf // 1024} KiB" if sock_buf else "kernel socket-buffer autotuning")
        + f"; median of {repeat}",
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
    ap.add_argument("--reuse", action="store_true", help="receive into one reused buffer (not fresh memory)")
    a = ap.parse_args(argv)
    result = measure(a.mib * MiB, a.repeat, a.sock_buf_kib * 1024, fresh=not a.reuse)
    print(json.dumps({"scenario": "loopback", **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
