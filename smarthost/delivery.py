"""The delivery half: scheduler and sender pool, pickup of the drop area, watcher.

`smarthost serve` runs it in a process of its own (`main`), started by the relay
(daemon.py) and fed through a pipe: frames of a kind byte and a 4-byte length, `Q` +
a committed queue ID or `C` + the pickled Config (at start and on reload). This module
imports nothing of the receiving side (no aiosmtpd, no asyncio): the process stays small.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
from typing import TYPE_CHECKING

from . import log, privileges, process
from .config import Config
from .pickup import Pickup
from .scheduler import Scheduler
from .sender import Sender
from .spool import Envelope, Spool
from .upstream import Upstreams
from .watcher import Watcher

if TYPE_CHECKING:
    from .metrics import DeliveryMetrics

STOP_GRACE = 5.0


class Delivery:
    """The delivery half: scheduler and sender pool, pickup of the drop area, watcher."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.upstreams = Upstreams(config)
        self.sender = Sender(config, spool, self.upstreams)
        self.scheduler = Scheduler(config, spool, self.sender)
        self.watcher: Watcher | None = None
        self.pickup: Pickup | None = None
        self.metrics: DeliveryMetrics | None = None  # set by `main` when metrics are on

    def submit(self, env: Envelope) -> None:
        self.scheduler.submit(env)

    def start(self) -> None:
        """Watches first, then the first scans: a file that lands in drop/ or is touched
        in queue/ while they run is either seen by the scan or wakes its reader, never
        left for the rescan (SPEC §6: picked up within a second)."""
        self.pickup = Pickup(self.config, self.spool, self.scheduler.submit)
        self.watcher = Watcher(self.spool, self.scheduler.notify, self.pickup.wake)
        self.watcher.start()  # returns once the watches are armed
        self.scheduler.start()  # its thread scans queue/ first
        self.pickup.start()  # its thread scans drop/ first

    def reload(self, config: Config) -> None:
        upstreams = Upstreams(config)
        old_upstreams, self.upstreams = self.upstreams, upstreams
        self.sender.use(config, upstreams)
        self.scheduler.use(config, upstreams)
        if self.pickup is not None:
            self.pickup.config = config
        if self.metrics is not None:
            self.metrics.use(config)
        self.config = config
        old_upstreams.retire()

    def stop(self, grace: float) -> bool:
        """Stop; True if every attempt in flight ended within `grace` seconds."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.pickup is not None:
            self.pickup.stop()
        clean = self.scheduler.stop(grace)
        self.upstreams.close_all()
        if self.metrics is not None:
            self.metrics.stop()
        return clean

    def healthy(self) -> bool:
        return True


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> tuple[bytes, bytes] | None:
    head = _read_exactly(fd, 5)
    if head is None:
        return None
    payload = _read_exactly(fd, struct.unpack(">I", head[1:])[0])
    return None if payload is None else (head[:1], payload)


def main() -> None:
    """The delivery process: `python -c "...; main()" PIPE_FD READY_FD LOCK_FD`."""
    pipe_fd, ready_fd, lock_fd = (int(arg) for arg in sys.argv[1:4])
    process.limit_malloc_arenas()
    first = _read_frame(pipe_fd)
    if first is None or first[0] != b"C":
        os._exit(1)  # the relay died before it could say anything
    config: Config = pickle.loads(first[1])
    account = privileges.service_account(config.user)
    if config.metrics.listen is not None:
        from . import metrics  # before the drop, like what it imports

        metrics.load_library()
    if account is not None and os.geteuid() == 0:
        "localhost".encode("idna")  # loaded on first use: maybe unreachable once dropped
        privileges.drop_to(account)
    process.die_with_parent()  # after the drop: a change of credentials clears it
    log.setup(config.log.level, config.log.file, config.log.format)
    spool = Spool(config.spool.dir)
    spool.adopt_lock(lock_fd)
    delivery = Delivery(config, spool)
    if config.metrics.listen is not None:
        from .metrics import DeliveryMetrics  # its files: the service user's

        delivery.metrics = DeliveryMetrics(config, spool)
        delivery.metrics.start()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the relay forwards reloads as frames
    delivery.start()
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    reader = threading.Thread(
        target=_follow_relay, args=(pipe_fd, delivery, stop), name="relay-pipe", daemon=True
    )
    reader.start()
    stop.wait()
    sys.exit(0 if delivery.stop(STOP_GRACE) else 1)


def _follow_relay(pipe_fd: int, delivery: Delivery, stop: threading.Event) -> None:
    while True:
        frame = _read_frame(pipe_fd)
        if frame is None:
            if not stop.is_set():
                os._exit(1)  # the relay is gone: so are we, at once
            return
        kind, payload = frame
        if kind == b"Q":
            queue_id = payload.decode()
            delivery.spool.committed_elsewhere(queue_id)
            delivery.scheduler.notify(queue_id, 0.0)
        elif kind == b"C":
            config = pickle.loads(payload)
            log.setup(config.log.level, config.log.file, config.log.format)
            delivery.reload(config)
