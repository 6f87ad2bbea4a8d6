"""The run gate: how many of a sites host's sites run a training script at once (``-t/--threads``).

A thousand simulated sites may wait for two places. A waiter here costs no CPU while it waits: it
sleeps until a place frees (one waiter is woken, the longest waiting, so sites train in the order
they asked) or until :meth:`RunGate.wake` says some job ended, never on a timer. (A semaphore polled
with a timeout, so that a waiter notices its job's end, woke each of a thousand waiters twice a
second: thousands of wake-ups a second on two cores.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["RunGate"]


class RunGate:
    """``places`` scripts at once; :meth:`acquire` waits its turn, :meth:`release` frees a place."""

    def __init__(self, places: int) -> None:
        if places < 1:
            raise ValueError(f"a run gate needs at least one place, not {places}")
        self.places = places
        self._free = places
        self._cond = threading.Condition()

    def acquire(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Take a place, waiting for one; False (no place taken) once ``give_up()`` is true, which is
        checked on every wake-up: call :meth:`wake` when what it reads changes."""
        with self._cond:
            while self._free <= 0:
                if give_up():
                    return False
                self._cond.wait()
            if give_up():
                self._cond.notify()  # the place this waiter was woken for goes to the next one
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        """Free a place: the longest waiting caller gets it."""
        with self._cond:
            if self._free >= self.places:
                raise RuntimeError("run gate released more often than acquired")
            self._free += 1
            self._cond.notify()

    def wake(self) -> None:
        """Make every waiter check its ``give_up`` (a job ended or is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def free(self) -> int:
        """Places free now."""
        with self._cond:
            return self._free
