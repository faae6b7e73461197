"""The composition root: start the parts in order, stop them in reverse, handle signals.

Two halves: receiving (listeners, commits) and delivery (scheduler and senders, pickup
of the drop area, watcher: delivery.py). `serve` runs the delivery half in a process of
its own (delivery_process.py), so the two don't take turns on one GIL: the receiver
hands it each committed queue ID through a pipe. A `Relay` given another delivery half
(tests give it one in the same process) runs that one.

Start: spool (lock, recovery) → a delivery process (forked while the relay is still
single-threaded) → listeners → privileges dropped (→ an in-process delivery half); only
then is the relay announced as started. Stop: listeners first (no new mail), then the commits
in flight, then delivery (attempts in flight get a few seconds; an unfinished message
simply stays spooled and is retried at the next start).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import __version__, libc, log, privileges, systemd
from .config import Config, ConfigError, for_reload, load_config
from .delivery_process import STOP_GRACE, DeliveryProcess
from .receiver import Receiver, auth_users, start_listeners
from .smtp_server import ClientSlots, Listeners
from .spool import TMP, Spool

if TYPE_CHECKING:
    from .delivery import DeliveryHalf
    from .metrics import MetricsServer

# A SIGUSR1 without a fresh timeout from `smarthost drain` (Spool.request_drain)
# drains for this long.
DRAIN_TIMEOUT = 300.0


class Relay:
    """One running relay: receiver, spool and the delivery half (by default in a
    process of its own, as `serve` runs it)."""

    def __init__(
        self,
        config: Config,
        delivery: Callable[[Config, Spool], DeliveryHalf] = DeliveryProcess,
    ) -> None:
        self.config = config
        self.spool = Spool(config.spool.dir)
        self.delivery = delivery(config, self.spool)
        self.receiver = Receiver(config, self.spool, self.delivery.submit)
        self.slots = ClientSlots(config.smtp.max_clients)
        self.listeners: Listeners | None = None
        self.metrics: MetricsServer | None = None
        self.started = self.draining = self.stopping = False

    def start(self) -> None:
        self.spool.create()
        self.spool.lock()
        recovered = self.spool.recover()
        account = privileges.service_account(self.config.user)
        if account is not None:
            privileges.hand_over(account, self.spool.root, self.config.log.file)
        # A delivery process first, while this one runs no thread yet, so that it can
        # be forked (delivery_process.py); it drops its rights itself. Then ports (port
        # 25 needs root), then no more root; an in-process delivery half picks up what
        # the listeners commit in between.
        metrics_dir = None
        if self.delivery.own_process and self.config.metrics.listen is not None:
            from .metrics import prepare_directory

            metrics_dir = prepare_directory(self.spool.root, account)  # the child's too
        if self.delivery.own_process:
            self.delivery.start()
        if metrics_dir is not None:
            from .metrics import start_server

            node = self.config.fleet.member
            self.metrics = start_server(self.config, self, account, metrics_dir, node)
        self.listeners = start_listeners(self.config, self.receiver, self.slots)
        if account is not None:
            privileges.drop_to(account)
        if not self.delivery.own_process:
            self.delivery.start()
        log.event(
            "started",
            version=__version__,
            pid=os.getpid(),
            delivery_pid=self.delivery.pid,
            listen=self.listeners.addresses,
            spool=self.spool.root,
            workers=self.config.delivery.workers,
            backends=[b.name for b in self.config.backends],
            recovered=recovered,
            user=account.pw_name if account else None,
            metrics=self.metrics.address if self.metrics else None,
        )
        self.started = True
        systemd.notify("READY=1")

    # -- what the metrics endpoint asks (metrics.RelayState) ---------------------

    def sessions(self) -> int:
        return self.slots.count

    def not_alive(self) -> str | None:
        if not self.delivery.alive():
            return "the delivery process is not running"
        return None

    def not_ready(self) -> str | None:
        if not self.started or self.stopping or self.draining:
            return "starting" if not self.started else "stopping" if self.stopping else "draining"
        if self.listeners is None or not self.listeners.running:
            return "not listening"
        if not os.access(self.spool.dir(TMP), os.W_OK):
            return f"the spool {self.spool.root} is not writable"
        st = os.statvfs(self.spool.root)
        if st.f_bavail == 0:
            return f"the spool's file system ({self.spool.root}) is full"
        return self.not_alive()

    def reload(self, config: Config) -> list[str]:
        """Take a new config for upstreams, routes, rewriting, users and logging,
        without dropping a session; what needs a restart (config.RESTART_ONLY) is
        returned, and kept as it was until then."""
        config, needs_restart = for_reload(self.config, config)
        users = auth_users(config)  # a bad users file refuses the whole reload
        try:
            log.setup_for(config)
        except OSError as exc:
            raise ConfigError(
                [f"log.file: cannot open {config.log.file}: {exc.strerror}"]
            ) from None
        self.delivery.reload(config)
        self.receiver.config, self.receiver.users = config, users
        self.config = config
        return needs_restart

    def stop(self, reason: str | None = None) -> None:
        self.stopping = True
        log.event("stopping", pid=os.getpid(), reason=reason)
        systemd.notify("STOPPING=1")
        # Stop accepting, let messages being committed get their 250, then close.
        if self.listeners is not None:
            self.listeners.stop_accepting()
        self.receiver.wait_for_commits(STOP_GRACE)
        if self.listeners is not None:
            self.listeners.stop()
        self.receiver.committer.stop()
        clean = self.delivery.stop(STOP_GRACE)
        self.spool.unlock()
        if self.metrics is not None:
            self.metrics.stop()
        log.event("stopped", pid=os.getpid(), clean=clean)

    def abort_start(self) -> None:
        """Undo a start that failed half-way (a port in use, an unwritable spool)."""
        if self.listeners is not None:
            self.listeners.stop()
        self.delivery.stop(0.0)
        self.receiver.committer.stop(0.0)
        self.spool.unlock()
        if self.metrics is not None:
            self.metrics.stop()


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config and reopens the log file;
    SIGUSR1 drains: no new sessions, delivery goes on, stop once nothing is due."""
    libc.limit_malloc_arenas()
    if config.metrics.listen is not None:
        from .metrics import requirement_errors

        if requirement_errors(config):
            raise ConfigError(requirement_errors(config))
    relay = Relay(config)
    stop, hup, drain = threading.Event(), threading.Event(), threading.Event()
    wake = threading.Event()
    flags: dict[int, threading.Event] = {
        signal.SIGHUP: hup,
        signal.SIGUSR1: drain,
        signal.SIGCHLD: wake,  # the delivery process died: replace it now
    }

    def on_signal(signum: int, frame: object) -> None:
        # Only flags here: the work happens in the main loop, outside the handler.
        flags.get(signum, stop).set()
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(signum, on_signal)
    try:
        relay.start()
    except BaseException:
        relay.abort_start()
        raise
    reason: str | None = None
    try:
        reason = _run_until_stopped(relay, stop, hup, drain, wake)
    finally:
        relay.stop(reason)  # whatever broke the loop: an orderly stop, nothing lost
    return 0


def _run_until_stopped(
    relay: Relay,
    stop: threading.Event,
    hup: threading.Event,
    drain: threading.Event,
    wake: threading.Event,
) -> str | None:
    """The main loop: replace a dead delivery process, reload, drain; the reason it
    ended for `stopping` (None: a signal)."""
    drain_until: float | None = None
    healthy = True
    while not stop.is_set():
        # Idle, the relay sleeps until a signal; it looks every second only while it
        # drains or waits to start a new delivery process.
        wake.wait(None if healthy and drain_until is None else 1.0)
        wake.clear()
        healthy = relay.delivery.healthy()
        if drain.is_set() and not stop.is_set():
            drain.clear()
            drain_until = start_drain(relay, drain_until is None)
        if drain_until is not None:
            if _nothing_due(relay.spool):
                return "drained"
            if time.monotonic() >= drain_until:
                return "drain_timeout"
        if hup.is_set() and not stop.is_set():
            hup.clear()
            reload(relay)
    return None


def _nothing_due(spool: Spool) -> bool:
    """Spool.nothing_due, with a spool that cannot be read now (EMFILE, EIO) as busy."""
    try:
        return spool.nothing_due()
    except OSError as exc:
        log.event("spool_error", level=logging.ERROR, error=f"drain check: {exc!r}")
        return False


def start_drain(relay: Relay, first: bool) -> float:
    """SIGUSR1: stop accepting sessions (the first time); the deadline, from the
    timeout `smarthost drain` left in the spool (a later drain sets a new one)."""
    requested = relay.spool.take_drain_request()
    timeout = DRAIN_TIMEOUT if requested is None else requested
    relay.draining = True
    log.event("draining", pid=os.getpid(), timeout=timeout)
    if first and relay.listeners is not None:
        relay.listeners.stop_accepting()
    return time.monotonic() + timeout


def reload(relay: Relay) -> None:
    """SIGHUP: a new config if it is valid (else the old one stays, loudly); the log
    file is reopened either way (after logrotate)."""
    systemd.notify("RELOADING=1")
    try:
        needs_restart = relay.reload(load_config(relay.config.path))
    except ConfigError as exc:
        try:
            log.reopen()
        except OSError as reopen_error:  # keep writing to the old file rather than die
            exc.errors.append(f"log.file: cannot reopen: {reopen_error.strerror}")
        log.event("config_reloaded", level=logging.ERROR, ok=False, errors=exc.errors)
    else:
        log.event("config_reloaded", ok=True, needs_restart=needs_restart or None)
    systemd.notify("READY=1")
