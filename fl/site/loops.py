"""A few threads that drive many site agents' poll and heartbeat loops (the simulator's sites host).

A production site (``fl site``) runs one agent with a poll thread and a heartbeat thread of its own.
A sites host that holds hundreds of simulated agents cannot afford two threads each: every thread
blocked in a gRPC call wakes several times a second, so a thousand of them keep the cores busy
doing nothing. Here one timer thread keeps every agent's next step in a heap and hands due steps to
a small worker pool; a long poll is an asynchronous gRPC call whose completion schedules the next
step, so waiting costs no thread at all.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fl.log import adapter

__all__ = ["SharedLoops"]

log = adapter("fl.site")
#: Workers that run due steps (a register, a heartbeat, handing a directive to a job): each is one
#: short loopback RPC or less, so a few serve a thousand agents.
DEFAULT_WORKERS = 4


class SharedLoops:
    """A timer heap and a worker pool: ``after(delay, step)`` runs ``step`` on a worker once due."""

    def __init__(self, workers: int = DEFAULT_WORKERS) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties in time keep their order; steps are never compared
        self._due = threading.Condition()
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fl-agents")
        self._timer = threading.Thread(target=self._serve, name="fl-agents-timer", daemon=True)
        self._timer.start()

    def after(self, delay: float, step: Callable[[], None]) -> None:
        """Run ``step`` on a worker ``delay`` seconds from now (never, once stopped)."""
        with self._due:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._order), step))
            self._due.notify()

    def stop(self) -> None:
        """Run nothing more; steps already running finish on their own."""
        with self._due:
            self._stopped = True
            self._heap.clear()
            self._due.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        with self._due:
            while not self._stopped:
                if not self._heap:
                    self._due.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._due.wait(wait)
                    continue
                _, _, step = heapq.heappop(self._heap)
                self._pool.submit(self._run, step)

    @staticmethod
    def _run(step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # one agent's bug must not stop every other agent's loop
            log.exception("a site agent's step failed")
