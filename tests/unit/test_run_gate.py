"""The run gate lets ``places`` scripts run at once, in the order their sites asked; a waiter sleeps without a
timer and gives up (taking no place) when woken after its job ended; it cannot be released more than taken."""

from __future__ import annotations

import threading
import time

import pytest

from fl.site.gate import RunGate

WAIT_S = 30.0


def _waiters(gate: RunGate, n: int, order: list[int], give_up=lambda: False) -> list[threading.Thread]:
    threads = []
    for i in range(n):
        t = threading.Thread(target=lambda i=i: gate.acquire(give_up) and order.append(i), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(0.05)  # each starts waiting before the next
    return threads


def test_places_are_handed_out_in_the_order_they_were_asked_for():
    gate = RunGate(1)
    assert gate.acquire()
    order: list[int] = []
    threads = _waiters(gate, 4, order)
    for expected in range(4):
        gate.release()
        deadline = time.monotonic() + WAIT_S
        while len(order) <= expected:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert order == list(range(expected + 1))
    gate.release()
    for t in threads:
        t.join(WAIT_S)
    assert gate.free() == 1


def test_a_waiter_whose_job_ended_gives_up_on_wake_and_its_place_goes_to_the_next():
    gate = RunGate(1)
    assert gate.acquire()
    ended = threading.Event()
    gave_up: list[bool] = []
    quitter = threading.Thread(target=lambda: gave_up.append(gate.acquire(ended.is_set)), daemon=True)
    quitter.start()
    time.sleep(0.05)
    order: list[int] = []
    (stayer,) = _waiters(gate, 1, order)
    ended.set()
    gate.wake()
    quitter.join(WAIT_S)
    assert gave_up == [False]
    gate.release()  # the quitter must not swallow this place
    stayer.join(WAIT_S)
    assert order == [0] and gate.free() == 0


def test_a_waiter_woken_for_a_place_after_its_job_ended_passes_the_place_on():
    gate = RunGate(1)
    assert gate.acquire()
    ended = threading.Event()
    first = threading.Thread(target=lambda: gate.acquire(ended.is_set), daemon=True)
    first.start()
    time.sleep(0.05)
    order: list[int] = []
    (second,) = _waiters(gate, 1, order)
    ended.set()  # no wake(): the release's one notification reaches the first waiter, which gives up
    gate.release()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert order == [0]


def test_release_without_acquire_and_a_gate_without_places_are_errors():
    gate = RunGate(2)
    with pytest.raises(RuntimeError, match="released more often"):
        gate.release()
    with pytest.raises(ValueError, match="at least one place"):
        RunGate(0)
