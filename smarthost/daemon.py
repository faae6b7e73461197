"""The composition root: start the parts in order, stop them in reverse, handle signals.

Start: spool (lock, recovery) → scheduler and senders → watcher → listeners; only then
is the relay announced as started. Stop: listeners first (no new mail), then the
commits in flight, then the senders (attempts in flight get a few seconds; an
unfinished message simply stays spooled and is retried at the next start).
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from . import __version__, log
from .config import Config
from .pickup import Pickup
from .receiver import Listener, Receiver, start_listeners
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
        self.scheduler.start()
        self.pickup = Pickup(self.config, self.spool, self.scheduler.submit)
        self.pickup.start()
        self.watcher = Watcher(self.spool, self.scheduler.notify, self.pickup.wake)
        self.watcher.start()
        self.listeners = start_listeners(self.config, self.receiver)
        log.event(
            "started",
            version=__version__,
            pid=os.getpid(),
            listen=[listener.address for listener in self.listeners],
            spool=self.spool.root,
            workers=self.config.delivery.workers,
            backends=[b.name for b in self.config.backends],
            recovered=recovered,
        )

    def stop(self) -> None:
        log.event("stopping", pid=os.getpid())
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
    """Run until SIGTERM or SIGINT; SIGHUP reopens the log file."""
    relay = Relay(config)
    stop = threading.Event()

    def on_stop(signum: int, frame: object) -> None:
        stop.set()

    def on_hup(signum: int, frame: object) -> None:
        log.reopen()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        relay.start()
    except BaseException:
        relay.abort_start()
        raise
    while not stop.wait(3600):
        pass
    relay.stop()
    return 0
