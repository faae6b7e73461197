"""Upstream backends and groups: which backend to try, its health, its rate, its sessions.

Each `[[backend]]` becomes a `Backend`: its pool of reusable SMTP sessions (at most
`max_connections`, closed after 30 s idle), its health (`max_fails` failures within
`fail_timeout` mark it down for `fail_timeout`, after which it is probed) and its rate
limit (its own, or in a fleet the one shared through Redis: SharedRate). `Upstreams`
routes each recipient to a group and picks, within the group, a
backend by smooth weighted round-robin (nginx's algorithm) over the healthy
non-backup backends; backups only while every non-backup backend is down.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from . import log
from .config import DEFAULT_GROUP, BackendConfig, Config, RouteConfig
from .rewrite import domain_of
from .spool import Envelope, Recipient

if TYPE_CHECKING:
    from .fleet import Fleet

SESSION_IDLE_TIMEOUT = 30.0


@dataclass
class Session:
    """An open, greeted (and where configured, encrypted and authenticated) connection."""

    smtp: smtplib.SMTP
    last_used: float
    reused: bool = False
    clean: bool = True  # False after a transaction that did not end in DATA: needs RSET
    used_now: bool = False  # the server has answered in the current transaction


class RateWindow:
    """At most `count` sends in any `period` seconds, as a sliding window.

    A send that does not fit gets a reservation: the earliest time it would fit,
    after the reservations already handed out, so waiting mail is spread over the
    coming slots instead of all waking at the next one.
    """

    def __init__(self, count: int, period: float) -> None:
        self.count = count
        self.period = period
        self._times: deque[float] = deque()

    def reserve(self, now: float) -> float:
        """Book a slot and return its time (`now` if one is free now)."""
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()
        if len(self._times) < self.count:
            slot = max(now, self._times[-1]) if self._times else now
        else:
            slot = self._times[-self.count] + self.period
        self._times.append(slot)
        return slot

    def cancel(self, slot: float) -> None:
        """Give back a booked slot that will not be used."""
        with suppress(ValueError):
            self._times.remove(slot)


class SharedRate:
    """A backend's `rate` for the whole fleet (SPEC §12), with RateWindow's
    `reserve`/`cancel`: each slot is booked in Redis by the fleet, or, while the fleet
    is degraded, locally at this relay's share (`rate` / relays last seen alive)."""

    def __init__(self, fleet: Fleet, account: str, count: int, period: float) -> None:
        self.fleet = fleet
        self.account = account  # the backend's name: one provider account
        self.interval = period / count
        # Degraded: one slot per (interval * relays alive), spaced as the shared slots are.
        self._local = RateWindow(1, self.interval)
        self._booked: dict[float, int] = {}  # local slot -> its Redis slot, oldest first

    def reserve(self, now: float) -> float:
        while self._booked:  # bookings whose time has come were used: forget them
            oldest = next(iter(self._booked))
            if oldest > now:
                break
            del self._booked[oldest]
        booked = self.fleet.book(self.account, self.interval)
        if booked is None:
            self._local.period = self.interval * self.fleet.alive
            return self._local.reserve(now)
        redis_slot, delay = booked
        if delay <= 0:
            return now
        slot = now + delay
        self._booked[slot] = redis_slot
        return slot

    def cancel(self, slot: float) -> None:
        redis_slot = self._booked.pop(slot, None)
        if redis_slot is not None:
            self.fleet.give_back(self.account, redis_slot)
        else:
            self._local.cancel(slot)


RateLimit = Union[RateWindow, SharedRate]


def rate_limit(config: BackendConfig, fleet: Fleet | None) -> RateLimit | None:
    """The backend's `rate`: its own, or shared by the fleet under its name."""
    if config.rate is None:
        return None
    if fleet is not None:
        return SharedRate(fleet, config.name, *config.rate)
    return RateWindow(*config.rate)


class Backend:
    """One upstream server: its sessions, health and rate."""

    def __init__(self, config: BackendConfig, fleet: Fleet | None = None) -> None:
        self.config = config
        self.name = config.name
        self.group = config.group
        self.current_weight = 0  # smooth weighted round-robin state
        self.fails: deque[float] = deque()
        self.down = False  # marked down by max_fails failures within fail_timeout
        self.retry_at = 0.0  # while down: when it may be tried (probed) again
        self.probe_wanted = False
        self.probing = False
        self.rate = rate_limit(config, fleet)
        self._tls_context: ssl.SSLContext | None = None
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._idle: list[Session] = []
        self._lock = threading.Lock()
        self.retired = False  # replaced by a reload: sessions in use close when returned

    def is_down(self, now: float) -> bool:
        return self.down and self.retry_at > now

    @property
    def tls_context(self) -> ssl.SSLContext:
        """Built once: loading the CA store costs tens of milliseconds."""
        if self._tls_context is None:
            self._tls_context = make_tls_context(self.config)
        return self._tls_context

    @contextmanager
    def session(self, connect: Callable[[Backend], smtplib.SMTP]) -> Iterator[Session]:
        """Lend a session (reused when one is idle); a broken one is closed, not returned."""
        self._slots.acquire()
        session = None
        try:
            session = self._take_idle() or Session(connect(self), time.monotonic())
            yield session
        except BaseException:
            if session is not None:
                close_session(session.smtp)
                session = None
            raise
        finally:
            if session is not None and self.retired:
                quit_session(session.smtp)
            elif session is not None:
                session.last_used = time.monotonic()
                session.reused = True
                with self._lock:
                    self._idle.append(session)
            self._slots.release()

    def _take_idle(self) -> Session | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                session = self._idle.pop()
                if now - session.last_used < SESSION_IDLE_TIMEOUT:
                    return session
                close_session(session.smtp)
        return None

    def close_idle(self, max_idle: float = SESSION_IDLE_TIMEOUT) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._idle if now - s.last_used >= max_idle]
            self._idle = [s for s in self._idle if now - s.last_used < max_idle]
        for session in stale:
            quit_session(session.smtp)

    def close_all(self) -> None:
        self.close_idle(max_idle=-1.0)


@dataclass
class Choice:
    """The backend to try next, or why there is none."""

    backend: Backend | None = None
    wait_until: float | None = None  # every candidate is over its rate until then


class Upstreams:
    """Every backend, grouped, with the routes that send each recipient to a group."""

    def __init__(
        self,
        config: Config,
        on_group_up: Callable[[str], None] | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.backends = [Backend(b, fleet) for b in config.backends]
        self.routes: tuple[RouteConfig, ...] = config.routes
        self.groups: dict[str, list[Backend]] = {}
        for backend in self.backends:
            self.groups.setdefault(backend.group, []).append(backend)
        self.on_group_up = on_group_up
        self.last_success: dict[str, float] = {}  # group -> time of its latest success
        self._lock = threading.Lock()
        self._reservations: dict[tuple[str, str], float] = {}  # (queue_id, backend) -> slot

    # -- routing ---------------------------------------------------------------

    def group_for(self, sender: str, recipient: str) -> str:
        """The group of the first route matching the sender's or recipient's domain."""
        sender_domain, rcpt_domain = domain_of(sender), domain_of(recipient)
        for route in self.routes:
            if sender_domain in route.sender_domain or rcpt_domain in route.recipient_domain:
                return route.group
        return DEFAULT_GROUP

    def partition(self, env: Envelope) -> dict[str, list[Recipient]]:
        """The unfinished recipients of a message, by the group that carries them."""
        groups: dict[str, list[Recipient]] = {}
        for rcpt in env.unfinished():
            groups.setdefault(self.group_for(env.sender, rcpt.address), []).append(rcpt)
        return groups

    # -- choice ----------------------------------------------------------------

    def choose(self, group: str, tried: set[str], queue_id: str, now: float) -> Choice:
        """The next backend of `group` for this message, by weight, health and rate."""
        with self._lock:
            members = self.groups.get(group, [])
            primaries = [b for b in members if not b.config.backup]
            pool = [b for b in primaries if not b.is_down(now) and b.name not in tried]
            if not pool and all(b.is_down(now) for b in primaries):
                pool = [
                    b
                    for b in members
                    if b.config.backup and not b.is_down(now) and b.name not in tried
                ]
            wait_until = None
            while pool:
                backend = _smooth_weighted_pick(pool)
                slot = self._rate_slot(backend, queue_id, now)
                if slot <= now:
                    # Going here: give back the slots booked elsewhere, now or before.
                    for other in self.backends:
                        if other is not backend:
                            self._cancel_slot(other, queue_id)
                    return Choice(backend)
                wait_until = slot if wait_until is None else min(wait_until, slot)
                pool.remove(backend)
            return Choice(None, wait_until)

    def _cancel_slot(self, backend: Backend, queue_id: str) -> None:
        slot = self._reservations.pop((queue_id, backend.name), None)
        if slot is not None and backend.rate is not None:
            backend.rate.cancel(slot)

    def _rate_slot(self, backend: Backend, queue_id: str, now: float) -> float:
        """When this message may go to `backend`: a booked slot is kept, not rebooked."""
        if backend.rate is None:
            return now
        key = (queue_id, backend.name)
        slot = self._reservations.get(key)
        if slot is None:
            slot = backend.rate.reserve(now)
            if slot > now:
                self._reservations[key] = slot
        elif slot <= now:
            del self._reservations[key]
        return slot

    # -- health ----------------------------------------------------------------

    def failed(self, backend: Backend, reply: str, now: float, down_now: bool = False) -> None:
        """Count a backend failure; `max_fails` within `fail_timeout` mark it down
        (`down_now`: at once, as for credentials its token endpoint refused)."""
        config = backend.config
        with self._lock:
            backend.fails.append(now)
            while backend.fails and backend.fails[0] <= now - config.fail_timeout:
                backend.fails.popleft()
            # A backend that is down stays down when its probe (or first try) fails.
            if (
                not backend.down
                and not down_now
                and (config.max_fails == 0 or len(backend.fails) < config.max_fails)
            ):
                return
            was_down = backend.down
            backend.down, backend.retry_at = True, now + config.fail_timeout
            backend.fails.clear()
        log.event(
            "backend_down",
            level=logging.WARNING,
            backend=backend.name,
            group=backend.group,
            reply=reply,
            still_down=was_down or None,
            fail_timeout=config.fail_timeout,
        )

    def succeeded(self, backend: Backend) -> None:
        """A session worked: the backend is up, and mail waiting for its group may go."""
        with self._lock:
            was_down = backend.down
            backend.down, backend.retry_at = False, 0.0
            backend.fails.clear()
            self.last_success[backend.group] = time.time()
        if was_down:
            log.event("backend_up", backend=backend.name, group=backend.group)
        if self.on_group_up is not None:
            self.on_group_up(backend.group)

    def probes_due(self, now: float) -> list[Backend]:
        """Down backends whose `fail_timeout` has ended, each handed out once."""
        with self._lock:
            due = [
                b
                for b in self.backends
                if not b.probing and (b.probe_wanted or (b.down and b.retry_at <= now))
            ]
            for backend in due:
                backend.probing, backend.probe_wanted = True, False
            return due

    def probe_done(self, backend: Backend) -> None:
        with self._lock:
            backend.probing = False

    def next_probe(self) -> float | None:
        with self._lock:
            times = [
                0.0 if b.probe_wanted else b.retry_at
                for b in self.backends
                if not b.probing and (b.probe_wanted or b.down)
            ]
        return min(times) if times else None

    def request_probe(self, group: str) -> None:
        """Check the group's backends at once (mail is waiting for them after a restart)."""
        with self._lock:
            for backend in self.groups.get(group, []):
                backend.probe_wanted = True

    def all_down(self, group: str, now: float) -> bool:
        """Every backend of `group` is marked down (`choose` would find none for it,
        whatever its rate)."""
        with self._lock:
            members = self.groups.get(group, [])
            return bool(members) and all(b.is_down(now) for b in members)

    def probing(self, group: str) -> bool:
        """A probe of one of the group's backends is running or asked for."""
        with self._lock:
            return any(b.probing or b.probe_wanted for b in self.groups.get(group, []))

    def size(self, group: str) -> int:
        return len(self.groups.get(group, []))

    # -- sessions --------------------------------------------------------------

    def close_idle(self) -> None:
        for backend in self.backends:
            backend.close_idle()

    def close_all(self) -> None:
        for backend in self.backends:
            backend.close_all()

    def retire(self) -> None:
        """Replaced by a reload: close idle sessions now, busy ones when they are done."""
        for backend in self.backends:
            backend.retired = True
            backend.close_all()


class Prober:
    """Probes backends that are down once their `fail_timeout` is over, or at once when
    asked (mail waits for their group): one thread per probe, a session and a NOOP.

    `speak(backend)` opens that session (the sender's job: it owns SMTP) and returns
    None if the backend answered, else what went wrong; `on_done(group)` hears each
    probe end, whatever its result, so that mail waiting for it can be released.
    """

    def __init__(
        self, speak: Callable[[Backend], str | None], on_done: Callable[[str], None]
    ) -> None:
        self.speak = speak
        self.on_done = on_done
        self._threads: list[threading.Thread] = []

    def start_due(self, upstreams: Upstreams, now: float) -> None:
        for backend in upstreams.probes_due(now):
            thread = threading.Thread(
                target=self._probe,
                args=(upstreams, backend),
                name=f"probe-{backend.name}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def _probe(self, upstreams: Upstreams, backend: Backend) -> None:
        try:
            trouble = self.speak(backend)
            if trouble is None:
                upstreams.succeeded(backend)  # releases the group's mail
            else:
                upstreams.failed(backend, trouble, time.time())
        finally:
            upstreams.probe_done(backend)
            self.on_done(backend.group)


def _smooth_weighted_pick(pool: list[Backend]) -> Backend:
    """nginx's smooth weighted round-robin: shares by weight, interleaved, not bursts."""
    total = 0
    best = pool[0]
    for backend in pool:
        backend.current_weight += backend.config.weight
        total += backend.config.weight
        if backend.current_weight > best.current_weight:
            best = backend
    best.current_weight -= total
    return best


def make_tls_context(backend: BackendConfig) -> ssl.SSLContext:
    """A client context that verifies certificates and host names unless told not to."""
    context = ssl.create_default_context(cafile=backend.tls_ca or None)
    if backend.tls_ca:
        context.load_default_certs()
    if not backend.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def close_session(smtp: smtplib.SMTP) -> None:
    with suppress(OSError):
        smtp.close()


QUIT_TIMEOUT = 2.0  # an idle session's QUIT must not hold up dispatch or a stop


def quit_session(smtp: smtplib.SMTP) -> None:
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(QUIT_TIMEOUT)
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        close_session(smtp)
