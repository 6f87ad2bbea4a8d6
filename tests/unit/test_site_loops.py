"""Many agents on few threads: the shared loops run due steps in time order and survive a failing step; the
registry wakes only the polls of the site a directive is for, and ends a poll whose caller went away."""

from __future__ import annotations

import threading

from fl.proto import federation_pb2 as pb
from fl.server.sites import SiteRegistry
from fl.site.loops import SharedLoops

WAIT_S = 30.0  # how long a test waits for something that should happen at once


def test_steps_run_in_the_order_they_fall_due_not_the_order_they_were_given():
    loops = SharedLoops(workers=1)
    ran: list[str] = []
    done = threading.Event()
    try:
        loops.after(0.3, lambda: (ran.append("late"), done.set()))
        loops.after(0.0, lambda: ran.append("now"))
        loops.after(0.1, lambda: ran.append("soon"))
        assert done.wait(WAIT_S)
    finally:
        loops.stop()
    assert ran == ["now", "soon", "late"]


def test_a_failing_step_does_not_stop_the_other_agents_steps():
    loops = SharedLoops(workers=1)
    after = threading.Event()

    def broken() -> None:
        raise RuntimeError("one agent's bug")

    try:
        loops.after(0.0, broken)
        loops.after(0.0, after.set)
        assert after.wait(WAIT_S)
    finally:
        loops.stop()


def test_nothing_runs_once_stopped():
    loops = SharedLoops(workers=1)
    ran = threading.Event()
    loops.after(0.2, ran.set)
    loops.stop()
    loops.after(0.0, ran.set)
    assert not ran.wait(0.5)


def _poll_in_thread(registry: SiteRegistry, session_id: str, is_active=lambda: True) -> tuple[threading.Thread, list]:
    replies: list[pb.PollReply] = []
    thread = threading.Thread(target=lambda: replies.append(registry.poll(session_id, WAIT_S, is_active)))
    thread.start()
    return thread, replies


def test_a_directive_wakes_its_own_site_s_poll_and_leaves_the_others_waiting():
    registry = SiteRegistry()
    a = registry.register("site-a", [], True)
    b = registry.register("site-b", [], True)
    poll_a, got_a = _poll_in_thread(registry, a.session_id)
    poll_b, got_b = _poll_in_thread(registry, b.session_id)
    try:
        registry.enqueue("site-a", pb.PollReply(end_job=pb.EndJob(job_id="j1", status="finished")))
        poll_a.join(WAIT_S)
        assert got_a and got_a[0].end_job.job_id == "j1"
        assert poll_b.is_alive() and not got_b
    finally:
        registry.stop()
        poll_b.join(WAIT_S)
    assert got_b == [pb.PollReply()]


def test_a_poll_whose_caller_went_away_ends_when_woken_and_takes_nothing():
    registry = SiteRegistry()
    session = registry.register("site-a", [], True)
    caller_here = threading.Event()
    caller_here.set()
    poll, got = _poll_in_thread(registry, session.session_id, caller_here.is_set)
    caller_here.clear()  # the RPC was cancelled; its end calls wake()
    registry.wake(session.session_id)
    poll.join(WAIT_S)
    assert not poll.is_alive() and got == [pb.PollReply()]
    registry.enqueue("site-a", pb.PollReply(end_job=pb.EndJob(job_id="j1")))
    assert registry.poll(session.session_id, 0.0).end_job.job_id == "j1"  # still queued for the next poll


def test_a_new_registration_ends_the_poll_of_the_site_s_previous_session():
    registry = SiteRegistry()
    old = registry.register("site-a", [], True)
    poll, got = _poll_in_thread(registry, old.session_id)
    registry.register("site-a", [], True)
    poll.join(WAIT_S)
    assert got and got[0].unknown_session
