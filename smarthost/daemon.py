"""The composition root: start the parts in order, stop them in reverse, handle signals.

Start: spool (lock, recovery) → scheduler and senders → watcher → listeners; only then
is the relay announced as started. Stop: listeners first (no new mail), then the
commits in flight, then the senders (attempts in flight get a few seconds; an
unfinished message simply stays spooled and is retried at the next start).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from . import __version__, log, privileges, systemd
from .config import Config, ConfigError, load_config
from .pickup import Pickup
from .receiver import Listener, Receiver, auth_users, start_listeners
from .scheduler import Scheduler
from .sender import Sender
from .spool import Spool
from .upstream import Upstreams
from .watcher import Watcher

STOP_GRACE = 5.0
# Spool commits run here so the event loop never waits on fsync.
COMMIT_THREADS = 8


class Relay:
    """One running relay: receiver, spool, watcher, scheduler and sender pool."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool.dir)
        self.upstreams = Upstreams(config)
        self.sender = Sender(config, self.spool, self.upstreams)
        self.scheduler = Scheduler(config, self.spool, self.sender)
        self.writers = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
        self.receiver = Receiver(config, self.spool, self.scheduler.submit, self.writers)
        self.watcher: Watcher | None = None
        self.pickup: Pickup | None = None
        self.listeners: list[Listener] = []

    def start(self) -> None:
        self.spool.create()
        self.spool.lock()
        recovered = self.spool.recover()
        account = privileges.service_account(self.config.user)
        if account is not None:
            privileges.hand_over(account, self.spool.root, self.config.log.file)
        # Ports first (port 25 needs root), then no more root; the scheduler picks
        # up what the listeners commit in between.
        self.listeners = start_listeners(self.config, self.receiver)
        if account is not None:
            privileges.drop_to(account)
        self.scheduler.start()
        self.pickup = Pickup(self.config, self.spool, self.scheduler.submit)
        self.pickup.start()
        self.watcher = Watcher(self.spool, self.scheduler.notify, self.pickup.wake)
        self.watcher.start()
        log.event(
            "started",
            version=__version__,
            pid=os.getpid(),
            listen=[listener.address for listener in self.listeners],
            spool=self.spool.root,
            workers=self.config.delivery.workers,
            backends=[b.name for b in self.config.backends],
            recovered=recovered,
            user=account.pw_name if account else None,
        )
        systemd.notify("READY=1")

    def reload(self, config: Config) -> list[str]:
        """Take a new config for upstreams, routes, rewriting, limits, users and logging,
        without dropping a session; what needs a restart is returned, not applied."""
        needs_restart = [
            key
            for key, old, new in (
                ("smtp.listen", self.config.smtp.listen, config.smtp.listen),
                ("spool.dir", self.config.spool.dir, config.spool.dir),
                ("user", self.config.user, config.user),
                ("delivery.workers", self.config.delivery.workers, config.delivery.workers),
                ("smtp.tls_cert", self.config.smtp.tls_cert, config.smtp.tls_cert),
                ("smtp.tls_key", self.config.smtp.tls_key, config.smtp.tls_key),
                ("smtp.max_clients", self.config.smtp.max_clients, config.smtp.max_clients),
                ("smtp.timeout", self.config.smtp.timeout, config.smtp.timeout),
                ("hostname", self.config.hostname, config.hostname),
                (
                    "smtp.max_message_size",
                    self.config.smtp.max_message_size,
                    config.smtp.max_message_size,
                ),
            )
            if old != new
        ]
        users = auth_users(config)  # a bad users file refuses the whole reload
        try:
            log.setup(config.log.level, config.log.file, config.log.format)
        except OSError as exc:
            raise ConfigError(
                [f"log.file: cannot open {config.log.file}: {exc.strerror}"]
            ) from None
        upstreams = Upstreams(config)
        old_upstreams, self.upstreams = self.upstreams, upstreams
        self.sender.use(config, upstreams)
        self.scheduler.use(config, upstreams)
        self.receiver.config, self.receiver.users = config, users
        if self.pickup is not None:
            self.pickup.config = config
        self.config = config
        old_upstreams.retire()
        return needs_restart

    def stop(self) -> None:
        log.event("stopping", pid=os.getpid())
        systemd.notify("STOPPING=1")
        # Stop accepting, let messages being committed get their 250, then close.
        for listener in self.listeners:
            listener.stop_accepting()
        self.receiver.wait_for_commits(STOP_GRACE)
        for listener in self.listeners:
            listener.stop()
        self.writers.shutdown(wait=True)
        if self.watcher is not None:
            self.watcher.stop()
        if self.pickup is not None:
            self.pickup.stop()
        clean = self.scheduler.stop(STOP_GRACE)
        self.upstreams.close_all()
        self.spool.unlock()
        log.event("stopped", pid=os.getpid(), clean=clean)

    def abort_start(self) -> None:
        """Undo a start that failed half-way (a port in use, an unwritable spool)."""
        for listener in self.listeners:
            listener.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.pickup is not None:
            self.pickup.stop()
        self.scheduler.stop(0.0)
        self.writers.shutdown(wait=False)
        self.spool.unlock()


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config and reopens the log file."""
    relay = Relay(config)
    stop, hup = threading.Event(), threading.Event()
    wake = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # Only flags here: the work happens in the main loop, outside the handler.
        (hup if signum == signal.SIGHUP else stop).set()
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        relay.start()
    except BaseException:
        relay.abort_start()
        raise
    while not stop.is_set():
        wake.wait(3600)
        wake.clear()
        if hup.is_set() and not stop.is_set():
            hup.clear()
            reload(relay)
    relay.stop()
    return 0


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
