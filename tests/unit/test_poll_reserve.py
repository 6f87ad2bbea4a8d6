"""Long polls never take every RPC worker: past ``max_parked_polls`` waiting polls, a poll with nothing to
deliver returns at once with a back-off the agent honours (bounded); a queued directive is still handed over
to a poll that finds no room to wait; the reserve of workers kept from polls, and the back-off, follow rules."""

from __future__ import annotations

import random
import threading
import time

import pytest

from fl.proto import federation_pb2 as pb
from fl.server.app import DEFAULT_RPC_WORKERS, reserved_rpc_workers, rpc_workers_for
from fl.server.sites import BUSY_RETRY_MAX_S, SiteRegistry, busy_retry_after
from fl.site.agent import MAX_BUSY_RETRY_S, poll_pause

WAIT_S = 30.0


def _park(registry: SiteRegistry, session_id: str) -> tuple[threading.Thread, list[pb.PollReply]]:
    replies: list[pb.PollReply] = []
    thread = threading.Thread(target=lambda: replies.append(registry.poll(session_id, WAIT_S)), daemon=True)
    thread.start()
    return thread, replies


def _wait_parked(registry: SiteRegistry, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while registry.parked_polls() < count:
        assert time.monotonic() < deadline, f"{registry.parked_polls()} polls parked, expected {count}"
        time.sleep(0.01)


def test_a_poll_past_the_parking_limit_returns_at_once_with_a_back_off_and_a_parked_one_still_waits():
    registry = SiteRegistry(max_parked_polls=2)
    sessions = [registry.register(f"site-{i}", [], True) for i in range(3)]
    parked = [_park(registry, s.session_id) for s in sessions[:2]]
    try:
        _wait_parked(registry, 2)
        started = time.monotonic()
        reply = registry.poll(sessions[2].session_id, WAIT_S)
        assert time.monotonic() - started < 5.0, "the third poll waited although no room was left"
        assert reply.WhichOneof("directive") is None and reply.retry_after_s >= 1.0
        assert registry.polls_refused == 1 and registry.parked_peak == 2
        assert all(t.is_alive() for t, _ in parked)  # the parked ones wait on
    finally:
        registry.stop()
        for t, _ in parked:
            t.join(WAIT_S)


def test_a_poll_with_no_room_to_wait_still_gets_its_queued_directive():
    registry = SiteRegistry(max_parked_polls=1)
    waiting, late = registry.register("site-a", [], True), registry.register("site-b", [], True)
    thread, _ = _park(registry, waiting.session_id)
    try:
        _wait_parked(registry, 1)
        registry.enqueue("site-b", pb.PollReply(end_job=pb.EndJob(job_id="j1", status="finished")))
        reply = registry.poll(late.session_id, WAIT_S)
        assert reply.end_job.job_id == "j1" and registry.polls_refused == 0
    finally:
        registry.stop()
        thread.join(WAIT_S)


def test_a_place_freed_by_an_answered_poll_lets_the_next_poll_wait():
    registry = SiteRegistry(max_parked_polls=1)
    a, b = registry.register("site-a", [], True), registry.register("site-b", [], True)
    thread, got = _park(registry, a.session_id)
    _wait_parked(registry, 1)
    registry.enqueue("site-a", pb.PollReply(end_job=pb.EndJob(job_id="j1")))
    thread.join(WAIT_S)
    assert got and got[0].end_job.job_id == "j1" and registry.parked_polls() == 0
    second, got_b = _park(registry, b.session_id)
    try:
        _wait_parked(registry, 1)  # parks instead of being refused
        assert registry.polls_refused == 0
    finally:
        registry.stop()
        second.join(WAIT_S)
    assert got_b == [pb.PollReply()]


def test_the_back_off_grows_with_sites_per_waiting_place_within_bounds_and_is_jittered():
    rng = random.Random(3)
    few = [busy_retry_after(300, 224, rng) for _ in range(200)]
    many = [busy_retry_after(1000, 224, rng) for _ in range(200)]
    assert min(few) >= 1.0 and max(few) < min(many)  # 1.3 places' worth vs 4.5
    assert len(set(many)) > 50  # jittered: refused sites do not come back together
    assert max(busy_retry_after(10**6, 1, rng) for _ in range(50)) == BUSY_RETRY_MAX_S


def test_the_agent_pauses_only_on_a_busy_servers_word_and_never_longer_than_its_bound():
    assert poll_pause(pb.PollReply()) == 0.0
    assert poll_pause(pb.PollReply(retry_after_s=4.5)) == 4.5
    assert poll_pause(pb.PollReply(retry_after_s=1e9)) == MAX_BUSY_RETRY_S
    assert poll_pause(pb.PollReply(retry_after_s=float("nan"))) == 0.0
    assert poll_pause(pb.PollReply(retry_after_s=-3)) == 0.0
    # a directive is acted on at once, whatever else the reply says
    assert poll_pause(pb.PollReply(end_job=pb.EndJob(job_id="j"), retry_after_s=9)) == 0.0


def test_workers_kept_from_polls_are_an_eighth_within_8_to_64_and_the_simulator_sizes_for_every_site():
    assert reserved_rpc_workers(DEFAULT_RPC_WORKERS) == 32
    assert reserved_rpc_workers(16) == 8 and reserved_rpc_workers(4096) == 64
    with pytest.raises(ValueError, match="at least 9 RPC workers"):
        reserved_rpc_workers(8)
    for sites in (2, 200, 1000, 5000):
        workers = rpc_workers_for(sites)
        assert workers - reserved_rpc_workers(workers) >= sites


def test_max_parked_polls_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        SiteRegistry(max_parked_polls=0)


def test_a_simulated_site_is_declared_lost_only_after_long_silence():
    """A simulated sites host that dies is seen when its process exits; a short loss timeout only
    ever caught hosts starved of CPU by their own scripts (slow, not lost)."""
    from fl.simulator import SIM_LOST_AFTER_S, liveness

    assert SIM_LOST_AFTER_S >= 120
    for sites in (2, 64, 256, 1000):
        settings = liveness(sites)
        assert settings.lost_after == max(SIM_LOST_AFTER_S, 4 * settings.heartbeat_interval)
