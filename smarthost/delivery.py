"""The delivery half: scheduler and sender pool, pickup of the drop area, watcher.

`DeliveryHalf` is what the relay (relay.py) asks of it. `Delivery` assembles it in
the calling process; `serve` runs that assembly in a process of its own
(delivery_process.py). This module imports nothing of the receiving side (no aiosmtpd,
no asyncio): the delivery process stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from . import fleet
from .config import Config
from .oauth2 import RefreshTokenKeeper
from .pickup import Pickup
from .scheduler import DEFAULT_INTERVALS, Intervals, Scheduler
from .sender import Sender
from .spool import Envelope, Spool
from .upstream import Upstreams
from .watcher import Watcher

if TYPE_CHECKING:
    from .metrics import DeliveryMetrics


class DeliveryHalf(Protocol):
    """What the relay asks of its delivery half, wherever it runs."""

    # True: it runs in a process of its own. Then `start` runs before the relay gives
    # up root (the process must still reach the interpreter, and drops its rights
    # itself), and only then are there metrics (the delivery process keeps the queue's).
    own_process: bool

    @property
    def pid(self) -> int | None:
        """The delivery process, if it has one of its own."""

    def start(self) -> None: ...

    def submit(self, env: Envelope) -> None:
        """A message just committed: send it now."""

    def reload(self, config: Config) -> None: ...

    def alive(self) -> bool:
        """It runs now (a process that died is not replaced by this call)."""

    def healthy(self) -> bool:
        """False while it is down (a process that died is replaced)."""

    def stop(self, grace: float) -> bool:
        """Stop; True if every attempt in flight ended within `grace` seconds."""


class Delivery:
    """The delivery half in this process: scheduler and sender pool, pickup, watcher."""

    own_process = False
    pid = None

    def __init__(self, config: Config, spool: Spool, intervals: Intervals = DEFAULT_INTERVALS):
        self.config = config
        self.spool = spool
        self.intervals = intervals
        # Before the first upstreams: a shared rate books through it (SPEC §12).
        self.fleet = fleet.membership(config)
        self.upstreams = Upstreams(config, fleet=self.fleet)
        self.sender = Sender(config, spool, self.upstreams)
        self.scheduler = Scheduler(config, spool, self.sender, intervals)
        self.watcher: Watcher | None = None
        self.pickup: Pickup | None = None
        self.token_keeper = RefreshTokenKeeper(config)
        self.metrics: DeliveryMetrics | None = None  # set in its process when metrics are on

    def submit(self, env: Envelope) -> None:
        self.scheduler.submit(env)

    def start(self) -> None:
        """Watches first, then the first scans: a file that lands in drop/ or is touched
        in queue/ while they run is either seen by the scan or wakes its reader, never
        left for the rescan (SPEC §6: picked up within a second)."""
        self.pickup = Pickup(self.config, self.spool, self.scheduler.submit, self.intervals.rescan)
        self.watcher = Watcher(self.spool, self.scheduler.hint, self.pickup.wake)
        if self.fleet is not None:
            self.fleet.start()  # announced before the first delivery books a shared slot
        self.watcher.start()  # returns once the watches are armed
        self.scheduler.start()  # its thread scans queue/ first
        self.pickup.start()  # its thread scans drop/ first
        self.token_keeper.start()

    def reload(self, config: Config) -> None:
        # `[fleet]` is read at start only: Redis and the node name stay as they were.
        upstreams = Upstreams(config, on_group_up=self.scheduler.group_up, fleet=self.fleet)
        old_upstreams, self.upstreams = self.upstreams, upstreams
        self.sender.reload(config, upstreams)
        self.scheduler.reload(config, upstreams)
        if self.pickup is not None:
            self.pickup.config = config
        if self.metrics is not None:
            self.metrics.use(config)
        self.config = config
        old_upstreams.retire()
        self.token_keeper.use(config)

    def stop(self, grace: float) -> bool:
        if self.watcher is not None:
            self.watcher.stop()
        if self.pickup is not None:
            self.pickup.stop()
        clean = self.scheduler.stop(grace)
        self.token_keeper.stop(grace)  # after the attempts: they may need its tokens
        self.upstreams.close_all()
        if self.fleet is not None:
            self.fleet.stop()
        if self.metrics is not None:
            self.metrics.stop()
        return clean

    def alive(self) -> bool:
        return True

    def healthy(self) -> bool:
        return True
