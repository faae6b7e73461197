"""Upstream backends and groups: which backend to try, and their open sessions.

Each `[[backend]]` becomes a `Backend` holding its reusable SMTP sessions (at most
`max_connections`, closed after 30 s idle). `Upstreams.candidates()` gives, for one
message, the backends of its route's group in the order to try them: non-backup
backends first, then backups.
"""

from __future__ import annotations

import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from .config import BackendConfig, Config, RouteConfig
from .spool import Envelope

SESSION_IDLE_TIMEOUT = 30.0
DEFAULT_GROUP = "default"


@dataclass
class Session:
    """An open, greeted (and where configured, encrypted and authenticated) connection."""

    smtp: smtplib.SMTP
    last_used: float
    reused: bool = False
    clean: bool = True  # False after a transaction that did not end in DATA: needs RSET
    used_now: bool = False  # the server has answered in the current transaction


class Backend:
    """One upstream server and the pool of sessions open to it."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self._tls_context: ssl.SSLContext | None = None
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._idle: list[Session] = []
        self._lock = threading.Lock()

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
            if session is not None:
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
            _quit(session.smtp)

    def close_all(self) -> None:
        self.close_idle(max_idle=-1.0)


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        close_session(smtp)


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


class Upstreams:
    """Every backend, grouped, with the routes that pick a group for a message."""

    def __init__(self, config: Config) -> None:
        self.backends = [Backend(b) for b in config.backends]
        self.routes: tuple[RouteConfig, ...] = config.routes
        self.groups: dict[str, list[Backend]] = {}
        for backend in self.backends:
            self.groups.setdefault(backend.config.group, []).append(backend)

    def group_for(self, env: Envelope) -> str:
        """The group of the first route the message matches, else "default"."""
        sender_domain = _domain(env.sender)
        rcpt_domains = {_domain(r.address) for r in env.recipients}
        for route in self.routes:
            if sender_domain in route.sender_domain or rcpt_domains & set(route.recipient_domain):
                return route.group
        return DEFAULT_GROUP

    def candidates(self, env: Envelope) -> list[Backend]:
        """Backends to try for this message, in order: primaries, then backups."""
        members = self.groups.get(self.group_for(env), [])
        return [b for b in members if not b.config.backup] + [b for b in members if b.config.backup]

    def close_idle(self) -> None:
        for backend in self.backends:
            backend.close_idle()

    def close_all(self) -> None:
        for backend in self.backends:
            backend.close_all()


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""
