"""Who is connected: site sessions, heartbeats, and each site's queue of directives.

Directives (start a job, run a task, end a job) are queued per site *name*, so that they survive a
site reconnecting with a new session. A site that misses heartbeats for ``lost_after`` seconds is
declared lost, and listeners (the task broker) fail what it had in flight.

A long poll waits on its own site's condition (all share the registry's one lock): a directive for
one site wakes that site's poll alone, and a waiting poll costs no CPU, so a server can hold a
thousand of them (the simulator's sites) without a wake-up per second each.

A waiting poll does hold one of the server's RPC worker threads, though. So that sites' polls can
never take every worker (heartbeats, uploads and admin calls would then queue behind polls that wait
a minute, and sites would be declared lost), at most ``max_parked_polls`` polls wait at once: past
that, a poll with nothing to deliver returns at once with ``retry_after_s``, a back-off the agent
honours before it polls again (:func:`busy_retry_after`). A directive is still handed over at the
first poll that finds it, parked or not.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fl.log import adapter
from fl.proto import federation_pb2 as pb

__all__ = ["BUSY_RETRY_BASE_S", "BUSY_RETRY_MAX_S", "SiteRegistry", "SiteSession", "busy_retry_after"]

log = adapter("fl.server", site="server")


@dataclass
class SiteSession:
    name: str
    session_id: str
    registered: float
    last_seen: float
    running_jobs: set[str] = field(default_factory=set)
    accepts_custom_code: bool = True
    connected: bool = True


SiteListener = Callable[[str, str], None]  # (site name, reason)

#: Seconds a refused poll's site waits before it polls again, when there are as many sites as polls
#: may wait; the hint grows with the sites per waiting slot, so that the refused polls of all sites
#: together come at about ``max_parked_polls / BUSY_RETRY_BASE_S`` a second however many sites there are.
BUSY_RETRY_BASE_S = 2.0
#: The longest back-off a refused poll is told (a directive waits at most this long for such a site).
BUSY_RETRY_MAX_S = 30.0


def busy_retry_after(sites: int, max_parked: int, rng: random.Random | None = None) -> float:
    """The back-off for a poll refused because ``max_parked`` polls already wait, with ``sites``
    sites connected: ``BUSY_RETRY_BASE_S`` per waiting slot's worth of sites, within 1 s to
    ``BUSY_RETRY_MAX_S``, jittered by +-25% so that refused sites do not come back together."""
    base = BUSY_RETRY_BASE_S * max(1.0, sites / max(1, max_parked))
    jitter = (rng or random).uniform(0.75, 1.25)
    return round(min(BUSY_RETRY_MAX_S, max(1.0, base * jitter)), 3)


class SiteRegistry:
    """Thread-safe registry of site sessions and directive queues."""

    def __init__(
        self, *, heartbeat_interval: float = 5.0, lost_after: float = 30.0, max_parked_polls: int | None = None
    ) -> None:
        """``max_parked_polls``: long polls that may wait at once (None: no limit); see the module's docstring."""
        if max_parked_polls is not None and max_parked_polls < 1:
            raise ValueError(f"max_parked_polls must be at least 1, not {max_parked_polls}")
        self.heartbeat_interval = heartbeat_interval
        self.lost_after = lost_after
        self.max_parked_polls = max_parked_polls
        self._parked = 0  # polls waiting now (under the lock)
        #: Polls that found nothing to deliver and no room to wait, since the start (for metrics and tests).
        self.polls_refused = 0
        #: The most polls that waited at once, since the start.
        self.parked_peak = 0
        self._mutex = threading.RLock()  # the registry's one lock, under every condition below
        self._lock = threading.Condition(self._mutex)  # notified when who is connected changes
        self._arrivals: dict[str, threading.Condition] = {}  # by site name, on the same lock: wakes its polls
        self._sessions: dict[str, SiteSession] = {}  # by session id
        self._by_name: dict[str, SiteSession] = {}
        self._queues: dict[str, deque[pb.PollReply]] = {}
        self._lost_listeners: list[SiteListener] = []
        self._joined_listeners: list[Callable[[SiteSession, SiteSession | None], None]] = []
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        #: Decides whether a queued directive is still wanted when it comes up (e.g. its task expired).
        self.directive_filter: Callable[[str, pb.PollReply], bool] = lambda site, d: True

    # ------------------------------------------------------------------ listeners
    def on_site_lost(self, listener: SiteListener) -> None:
        self._lost_listeners.append(listener)

    def on_site_joined(self, listener: Callable[[SiteSession, SiteSession | None], None]) -> None:
        """``listener(new_session, previous_session_or_None)`` after every registration."""
        self._joined_listeners.append(listener)

    # ------------------------------------------------------------------ sessions
    def register(self, name: str, running_jobs: list[str], accepts_custom_code: bool) -> SiteSession:
        now = time.time()
        session = SiteSession(
            name=name,
            session_id=secrets.token_hex(16),
            registered=now,
            last_seen=now,
            running_jobs=set(running_jobs),
            accepts_custom_code=accepts_custom_code,
        )
        with self._lock:
            previous = self._by_name.get(name)
            if previous is not None:
                self._sessions.pop(previous.session_id, None)
                previous.connected = False
            self._sessions[session.session_id] = session
            self._by_name[name] = session
            self._queues.setdefault(name, deque())
            self._lock.notify_all()
            self._arrival(name).notify_all()  # a poll of the previous session ends with unknown_session
        log.info(
            "site %s %s (running jobs: %s)",
            name,
            "re-registered" if previous else "registered",
            ", ".join(sorted(running_jobs)) or "none",
        )
        for listener in self._joined_listeners:
            listener(session, previous)
        return session

    def lookup(self, session_id: str) -> SiteSession | None:
        """The live session ``session_id`` names, changing nothing (who owns it is checked before any touch)."""
        with self._lock:
            return self._sessions.get(session_id)

    def touch(self, session_id: str, running_jobs: list[str] | None = None) -> SiteSession | None:
        """Count a call as a sign of life: last_seen, running_jobs, connected. Only for a checked caller."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            session.last_seen = time.time()
            if running_jobs is not None:
                session.running_jobs = set(running_jobs)
            if not session.connected:
                session.connected = True
                log.info("site %s is back", session.name)
                self._lock.notify_all()
            return session

    def session(self, name: str) -> SiteSession | None:
        with self._lock:
            return self._by_name.get(name)

    def connected_sites(self) -> list[str]:
        with self._lock:
            return sorted(n for n, s in self._by_name.items() if s.connected)

    def all_sessions(self) -> list[SiteSession]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda s: s.name)

    def wait_for(self, names: list[str] | None, count: int, timeout: float, stop: threading.Event) -> list[str]:
        """Wait until ``count`` sites (of ``names``, if given) are connected; returns those connected."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                ready = [n for n in self.connected_sites() if names is None or n in names]
                if len(ready) >= count or stop.is_set() or time.monotonic() >= deadline:
                    return ready
                self._lock.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def expel(self, name: str, reason: str) -> bool:
        """End ``name``'s session now (its session id stops working) and tell listeners it is lost."""
        with self._lock:
            session = self._by_name.get(name)
            if session is None or self._sessions.pop(session.session_id, None) is None:
                return False
            session.connected = False
            self._lock.notify_all()
            self._arrival(name).notify_all()
        log.warning("site %s expelled: %s", name, reason)
        for listener in self._lost_listeners:
            listener(name, reason)
        return True

    # ------------------------------------------------------------------ directives
    def _arrival(self, site: str) -> threading.Condition:
        """The condition ``site``'s polls wait on (call with the lock held)."""
        arrival = self._arrivals.get(site)
        if arrival is None:
            arrival = self._arrivals[site] = threading.Condition(self._mutex)
        return arrival

    def enqueue(self, site: str, directive: pb.PollReply) -> None:
        with self._lock:
            self._queues.setdefault(site, deque()).append(directive)
            self._arrival(site).notify_all()

    def wake(self, session_id: str) -> None:
        """Make the session's waiting polls look again (e.g. their caller went away: they end)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._arrival(session.name).notify_all()

    def poll(self, session_id: str, wait: float, is_active: Callable[[], bool] = lambda: True) -> pb.PollReply:
        """The next wanted directive for the session's site, waiting up to ``wait`` seconds.

        Waiting is not a sign of life: only the call itself counts as one (a site that died mid-poll
        must still be declared lost), and a caller that went away gets nothing popped for it (its
        RPC's end should call :meth:`wake`, so that the wait ends at once). When ``max_parked_polls``
        polls already wait, an empty reply with ``retry_after_s`` comes back at once instead.
        """
        deadline = time.monotonic() + max(0.0, min(wait, 60.0))
        with self._lock:
            first = True
            parked = False
            try:
                while True:
                    session = self._sessions.get(session_id)
                    if session is None:
                        return pb.PollReply(unknown_session=True)
                    if first:
                        session.last_seen = time.time()
                        first = False
                    if not is_active():
                        return pb.PollReply()
                    queue = self._queues.setdefault(session.name, deque())
                    while queue:
                        directive = queue.popleft()
                        if self.directive_filter(session.name, directive):
                            return directive
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stop.is_set():
                        return pb.PollReply()
                    if not parked:
                        if self.max_parked_polls is not None and self._parked >= self.max_parked_polls:
                            self.polls_refused += 1
                            hint = busy_retry_after(len(self._sessions), self.max_parked_polls)
                            return pb.PollReply(retry_after_s=hint)
                        parked = True
                        self._parked += 1
                        self.parked_peak = max(self.parked_peak, self._parked)
                    self._arrival(session.name).wait(remaining)
            finally:
                if parked:
                    self._parked -= 1

    def parked_polls(self) -> int:
        """Long polls waiting now."""
        with self._lock:
            return self._parked

    def drop_directives(self, site: str, predicate: Callable[[pb.PollReply], bool]) -> None:
        with self._lock:
            queue = self._queues.get(site)
            if queue:
                self._queues[site] = deque(d for d in queue if not predicate(d))

    # ------------------------------------------------------------------ liveness
    def start(self) -> None:
        self._reaper = threading.Thread(target=self._reap, name="fl-site-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
            for arrival in self._arrivals.values():
                arrival.notify_all()

    def _reap(self) -> None:
        while not self._stop.wait(min(1.0, self.lost_after / 4)):
            now = time.time()
            lost: list[SiteSession] = []
            with self._lock:
                for session in self._by_name.values():
                    if session.connected and now - session.last_seen > self.lost_after:
                        session.connected = False
                        lost.append(session)
            for session in lost:
                reason = f"no heartbeat for {now - session.last_seen:.0f} s"
                log.warning("site %s lost: %s", session.name, reason)
                for listener in self._lost_listeners:
                    listener(session.name, reason)
