"""The queue manager's dispatcher: what is due, and which sender thread takes it.

An in-memory index (queue ID → due time, with a heap) says what to send next. It is
only a cache: a scan of queue/ rebuilds it at start and every `Intervals.rescan`, and
every event (a commit by the receiver, a file the watcher saw) merely adds a hint.
A message is handed to a worker only while a worker is free, so claimed (active/)
mail is never more than the pool can carry. What becomes of a message after its
attempt is outcome.py's; probing a down backend is upstream.py's `Prober`.
"""

from __future__ import annotations

import collections
import heapq
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import log, retry
from .bounce import Bouncer
from .config import Config
from .outcome import Outcome, Requeued
from .sender import Sender
from .spool import ACTIVE, HOLD, QUEUE, CorruptEnvelope, Envelope, Spool
from .upstream import Prober, Upstreams

# A queue file's mtime is its due time; allow for the coarse clock file times use.
_CLOCK_SLACK = 0.05
# Due this much before the envelope's own next_attempt: made due by an administrator
# (`queue flush`, `queue release`), not by the relay's schedule.
_EARLY = 1.0


@dataclass(frozen=True)
class Intervals:
    """How often the dispatcher looks at the spool itself, in seconds."""

    rescan: float = 10.0  # a full read of queue/: hints lost or never given
    stray_active: float = 120.0  # longer than a queue command waits for an attempt
    # Due mail waits this long for busy workers before the dispatcher looks whether
    # one more would help (`Scheduler._may_wake_another`), and again after as long.
    more_workers: float = 0.01


# One more worker helps when the busy ones spent at least this share of their time
# waiting on their upstreams: the rest of the time they run, and take turns on the GIL.
_WAITING_SHARE = 0.5


DEFAULT_INTERVALS = Intervals()


class Scheduler:
    """Hands due messages to a pool of sender threads."""

    def __init__(
        self, config: Config, spool: Spool, sender: Sender, intervals: Intervals = DEFAULT_INTERVALS
    ) -> None:
        self.config = config
        self.spool = spool
        self.sender = sender
        self.intervals = intervals
        self.upstreams = sender.upstreams
        self.upstreams.on_group_up = self.group_up
        self.outcome = Outcome(config, spool, self.upstreams, Bouncer(config, spool, self.submit))
        self.prober = Prober(sender.probe, self._probe_done)
        self._waiting: dict[str, set[str]] = {}  # group -> queue IDs waiting for it
        self._flushed: dict[str, set[str]] = {}  # group -> flushed IDs waiting for its probe
        # In active/ because a worker of ours took it; counted, as two workers may be
        # handed one ID (a second hint before the claim) and only one claim succeeds.
        self._claimed: collections.Counter[str] = collections.Counter()
        self._rescued: dict[str, tuple[Envelope, int]] = {}  # see _rescue
        self._sent_now: set[str] = set()  # due now, whatever their files' mtime says
        self._rebuilder: threading.Thread | None = None
        self._heap: list[tuple[float, str]] = []
        self._index: dict[str, float] = {}
        self._cond = threading.Condition()
        self._work: queue.Queue[str | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        # Workers busy at once before due mail waits for them; attempts ended so far;
        # and since when (on the monotonic clock) due mail has waited, with the
        # workers' upstream waits and the attempts ended then.
        self._wanted = 1
        self._ended = 0
        self._backlog: tuple[float, float, int] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self, config: Config, upstreams: Upstreams) -> None:
        """A reloaded config; mail waiting for a group is released by the new backends."""
        upstreams.on_group_up = self.group_up
        self.config, self.upstreams = config, upstreams
        self.outcome.reload(config, upstreams)
        with self._cond:
            groups = set(self._waiting) | set(self._flushed)
            self._cond.notify()
        for group in groups:
            upstreams.request_probe(group)

    # -- hints from outside --------------------------------------------------

    def hint(self, queue_id: str, due: float | None = None) -> None:
        """A message may be due at `due` (None: read its due time from the spool)."""
        if due is None:
            due = self.spool.due(QUEUE, queue_id)
            if due is None:
                return
        with self._cond:
            known = self._index.get(queue_id)
            if known is not None and known <= due:
                return  # an earlier hint stands: a late one must not push it back
            self._index[queue_id] = due
            heapq.heappush(self._heap, (due, queue_id))
            now = time.time()
            if due <= now and self._idle > 0 and not self._stopping.is_set():
                # Due, and a worker is free: hand it over from here, not through a
                # wake-up of the scheduler thread (one thread hop less per message).
                # Mail that waits for busy workers is the scheduler thread's to time,
                # from when it began to wait.
                waited_before = self._backlog is not None
                self._dispatch_due(now)
                if (waited_before or self._backlog is None) and not self._times_probes():
                    return
            self._cond.notify()

    def submit(self, env: Envelope) -> None:
        self.committed(env.id)

    def committed(self, queue_id: str) -> None:
        """A message just committed: send it now, ahead of mail that waited (due 0),
        and without a look at its file's due time, which is its commit's."""
        with self._cond:
            self._sent_now.add(queue_id)
        self.hint(queue_id, 0.0)

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.config.delivery.workers):
            thread = threading.Thread(target=self._worker, name=f"sender-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)
        self._idle = len(self._workers)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()
        self._rebuilder = threading.Thread(
            target=self._rebuild_waiting, name="waiting-index", daemon=True
        )
        self._rebuilder.start()

    def stop(self, grace: float = 5.0) -> bool:
        """Stop dispatching; wait up to `grace` seconds for attempts in flight."""
        self._stopping.set()
        self.sender.stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(grace)
        for _ in self._workers:
            self._work.put(None)
        deadline = time.monotonic() + grace
        others = [t for t in (self._rebuilder, *self.prober.threads()) if t is not None]
        for thread in self._workers + others:
            thread.join(max(0.0, deadline - time.monotonic()))
        # A worker still stuck on an upstream leaves its message in active/,
        # which the next start hands back to the queue.
        return not any(t.is_alive() for t in self._workers + others)

    # -- the dispatch loop -----------------------------------------------------

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stopping.is_set():
            try:
                next_scan = self._run_once(next_scan)
            except Exception as exc:  # EMFILE, EIO...: never let dispatch die for good
                log.event("spool_error", level=logging.ERROR, error=f"scheduler: {exc!r}")
                self._stopping.wait(1.0)

    def _run_once(self, next_scan: float) -> float:
        now = time.time()
        if now >= next_scan:
            self._scan()
            self._reclaim_stray_active(now)
            self.upstreams.close_idle()
            next_scan = now + self.intervals.rescan
        self.prober.start_due(self.upstreams, now)
        with self._cond:
            now = time.time()  # the scan may have taken a while
            self._dispatch_due(now)
            # Looked at under the lock `stop` notifies with: a stop that came while this
            # thread scanned must not leave it asleep until the next scan.
            if not self._stopping.is_set():
                self._cond.wait(self._sleep_time(now, next_scan))
        return next_scan

    def _reclaim_stray_active(self, now: float) -> None:
        """An envelope in active/ that no worker of ours holds goes back to the queue:
        at once while no queue command may be holding it (a delivery process that
        died left it there), else once it is clearly abandoned."""
        with self.spool.no_command_claims() as nobody_else:
            for queue_id in list(self.spool.each_name(ACTIVE)):
                with self._cond:
                    if queue_id in self._claimed:
                        continue
                moved_in = self.spool.moved_in_at(ACTIVE, queue_id)
                if moved_in is None:
                    continue
                abandoned = now - moved_in > self.intervals.stray_active
                if (nobody_else or abandoned) and self.spool.move(queue_id, ACTIVE, QUEUE):
                    self.hint(queue_id)

    def _dispatch_due(self, now: float) -> None:
        while self._idle > 0 and self._may_wake_another(now):
            queue_id = self._pop_due(now)
            if queue_id is None:
                return
            self._idle -= 1
            self._work.put(queue_id)

    def _may_wake_another(self, now: float) -> bool:
        """Whether due mail may go to an idle worker now (with `_cond` held).

        At once while fewer than `_wanted` workers are busy. Beyond that the mail waits
        for the busy ones, each of which takes the next due message itself when its
        attempt ends. With a fast upstream that is sooner than an idle thread wakes,
        and more threads would only take turns on the GIL, and take the CPU from the
        receiving half. Each time mail has waited `Intervals.more_workers`, one more
        worker is wanted if the busy ones mostly waited on their upstreams meanwhile,
        or if none of their attempts ended (stuck on whatever it may be: a backend's
        connection slots, a slow disk); each time a worker finds nothing due, one
        fewer (`_next_work`). So a slow upstream soon has every worker, and a fast
        one as few as keep up.
        """
        busy = len(self._workers) - self._idle
        if busy < self._wanted or self._nothing_due(now):
            return True  # (nothing due: _pop_due says so)
        clock, waited = self.sender.waits.total()
        if self._backlog is None:
            self._backlog = (clock, waited, self._ended)
            return False
        since, waited_before, ended_before = self._backlog
        if clock - since < self.intervals.more_workers:
            return False
        self._backlog = (clock, waited, self._ended)  # the next look covers from now
        mostly_waiting = waited - waited_before >= _WAITING_SHARE * busy * (clock - since)
        if not mostly_waiting and self._ended != ended_before:
            return False
        self._wanted = min(len(self._workers), busy + 1)
        return True

    def _nothing_due(self, now: float) -> bool:
        """Whether no message is due by `now` (with `_cond` held). Entries a later hint
        superseded are taken off the heap's top first: they are no mail waiting."""
        while self._heap and self._index.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return not self._heap or self._heap[0][0] > now

    def _pop_due(self, now: float) -> str | None:
        """Take the earliest message due by `now` off the heap (with `_cond` held)."""
        if self._nothing_due(now):
            self._backlog = None
            return None
        _, queue_id = heapq.heappop(self._heap)
        del self._index[queue_id]
        if self._nothing_due(now):
            self._backlog = None  # it was the last due: no mail waits now
        return queue_id

    def _sleep_time(self, now: float, next_scan: float) -> float:
        wait = next_scan - now
        if self._idle > 0 and self._backlog is not None:
            since = self._backlog[0]
            wait = min(wait, since + self.intervals.more_workers - time.monotonic())
        elif self._idle > 0 and self._heap:
            wait = min(wait, self._heap[0][0] - now)
        probe = self.upstreams.next_probe()
        if probe is not None:
            wait = min(wait, probe - now)
        return max(0.0, wait)

    def _scan(self) -> None:
        """Hint every queued message the index lacks. A message it holds keeps its
        hint (a touch reaches the watcher), so a long queue costs a directory read,
        not a stat per message."""
        queued = set(self.spool.each_name(QUEUE))
        with self._cond:
            known = set(self._index)
        indexed = 0
        for queue_id in queued - known:
            due = self.spool.due(QUEUE, queue_id)
            if due is not None:  # else claimed or moved while we looked
                self.hint(queue_id, due)
                indexed += 1
        self._forget_gone(queued)
        log.event("queue_scanned", level=logging.DEBUG, queued=len(queued), indexed=indexed)

    def _forget_gone(self, queued: set[str]) -> None:
        """Drop what is remembered of messages that left the queue for good (deleted
        by a queue command, say), which no attempt will come round to clear."""
        with self._cond:
            remembered = set(self._rescued) | self._sent_now
            for ids in (*self._waiting.values(), *self._flushed.values()):
                remembered |= ids
            candidates = remembered - queued - set(self._claimed)
        where = {queue_id: self.spool.locate(queue_id) for queue_id in candidates}
        gone = {q for q, state in where.items() if state not in (QUEUE, ACTIVE, HOLD)}
        # A held message is kept for its release, but not as due now: that was for an
        # attempt it no longer waits for.
        not_queued = {q for q, state in where.items() if state not in (QUEUE, ACTIVE)}
        if not not_queued:
            return
        with self._cond:
            for queue_id in gone:
                self._rescued.pop(queue_id, None)
            self._sent_now -= not_queued
            for ids in (*self._waiting.values(), *self._flushed.values()):
                ids -= gone

    def _worker(self) -> None:
        queue_id = self._work.get()
        while queue_id is not None:
            try:
                self._process(queue_id)
            finally:
                queue_id = self._next_work()

    def _next_work(self) -> str | None:
        """After an attempt: a message already due is this worker's at once; else it
        waits for the scheduler (woken only if it has something to time), and one
        fewer worker is wanted busy."""
        with self._cond:
            self._ended += 1
            if not self._stopping.is_set():
                queue_id = self._pop_due(time.time())
                if queue_id is not None:
                    return queue_id
                self._wanted = max(1, self._wanted - 1)
            self._idle += 1
            if self._heap or self._times_probes():
                self._cond.notify()
        return self._work.get()

    def _times_probes(self) -> bool:
        """A backend is down or wants a probe: the scheduler thread must time it (an
        attempt may just have marked it down)."""
        return self.upstreams.next_probe() is not None

    def _rescue(self, queue_id: str, env: Envelope | None, error: BaseException) -> None:
        """Put back a message whose attempt broke (a full disk, a bug), to try later.

        The envelope as this attempt left it stays in memory, so recipients delivered
        meanwhile are not sent again and failures not yet reported are reported next
        time; repeated breaks back off like deferrals.
        """
        log.event("spool_error", level=logging.ERROR, queue_id=queue_id, error=repr(error))
        count = self._rescued.get(queue_id, (None, 0))[1] + 1
        if env is not None:
            self._rescued[queue_id] = (env, count)
        delivery = self.config.delivery
        due = time.time() + retry.backoff(count, delivery.retry_min, delivery.retry_max)
        try:
            # Stamp the due time first: once in queue/ it must not look due at once.
            if self.spool.set_due(ACTIVE, queue_id, due):
                if self.spool.move(queue_id, ACTIVE, QUEUE):
                    self.hint(queue_id, due)
            elif self.spool.due(QUEUE, queue_id) is not None:
                # Never claimed (the claim itself failed): still in queue/, and no hint
                # is left for it before the next rescan.
                self.hint(queue_id, due)
        except OSError as exc:
            log.event("spool_error", level=logging.ERROR, queue_id=queue_id, error=repr(exc))

    # -- one message -----------------------------------------------------------

    def _process(self, queue_id: str) -> None:
        if self._stopping.is_set():
            return  # stays queued for the next start
        with self._cond:
            sent_now = queue_id in self._sent_now
            self._sent_now.discard(queue_id)
        if not sent_now and not self._due_by_its_file(queue_id):
            return
        with self._cond:
            self._claimed[queue_id] += 1
        env = None
        try:
            claimed = self.spool.claim_message(queue_id)
            if claimed is None:
                return
            env, content = claimed
            # A message whose last attempt broke: what that attempt learned is newer.
            env = self._rescued.get(queue_id, (env, 0))[0] or env
            try:
                attempt = self.sender.attempt(env, content)
            except FileNotFoundError:
                self.spool.quarantine(env.id, "active", "message content is missing")
                return
            except CorruptEnvelope as exc:  # content cut short, or not a file
                self.spool.quarantine(env.id, "active", str(exc))
                return
            self._after(self.outcome.settle(env, attempt), env.id)
            self._rescued.pop(queue_id, None)
        except Exception as exc:  # a full disk or a bug must not kill the worker
            self._rescue(queue_id, env, exc)
        finally:
            with self._cond:
                self._claimed[queue_id] -= 1
                if not self._claimed[queue_id]:
                    del self._claimed[queue_id]

    def _due_by_its_file(self, queue_id: str) -> bool:
        """Whether a hinted message is to be sent now, by its file's due time (a mail
        made due in memory, `send_now`, skips this look): not if it is gone, not yet
        due (a stale hint), or waits for a probe first."""
        due = self.spool.due(QUEUE, queue_id)
        if due is None:
            return False  # taken by someone else (queue command) or already done
        if due > time.time() + _CLOCK_SLACK:
            self.hint(queue_id, due)  # a stale hint: not due yet
            return False
        return not self._probe_first(queue_id, due)  # else sent when the probe is done

    def _after(self, requeued: Requeued | None, queue_id: str) -> None:
        """A settled attempt: index a requeued message again, and note what it waits for."""
        if requeued is None:
            return
        self._wait_for_groups(queue_id, requeued.waiting_groups)
        if requeued.group_came_back:
            self.send_now(queue_id)  # a probe succeeded while this was being settled
        self.hint(queue_id, requeued.due)

    # -- fast recovery ---------------------------------------------------------

    def _wait_for_groups(self, queue_id: str, groups: Iterable[str]) -> None:
        with self._cond:
            for group in groups:
                self._waiting.setdefault(group, set()).add(queue_id)

    def send_now(self, queue_id: str) -> None:
        """Make a waiting message due now, whatever its due time on disk says.

        Only in memory: after a restart the waiting index is rebuilt and the group
        probed again, so nothing is lost, and 100,000 messages released at once cost
        no file operation each.
        """
        with self._cond:
            self._sent_now.add(queue_id)
        self.hint(queue_id, time.time())

    def group_up(self, group: str) -> None:
        """A backend of `group` answers again: mail that waited only for it goes now."""
        with self._cond:
            waiting = self._waiting.pop(group, set()) | self._flushed.pop(group, set())
        for queue_id in waiting:
            self.send_now(queue_id)
        if waiting:
            log.event("released", group=group, messages=len(waiting))

    def _probe_done(self, group: str) -> None:
        """A probe of `group` ended. If none is left and none answered, the flushed
        mail gets the attempt it was asked for (deferred, as the backends are still
        down); if one answered, `group_up` has released it already."""
        flushed: set[str] = set()
        with self._cond:
            if not self.upstreams.probing(group):
                flushed = self._flushed.pop(group, set())
            self._cond.notify()
        for queue_id in flushed:
            self.send_now(queue_id)

    def _probe_first(self, queue_id: str, due: float) -> bool:
        """A message made due before its time by an administrator (`queue flush`,
        `queue release`) while every backend of its groups is marked down: probe those
        backends first and send it when the probes are done (at once when one answers),
        instead of spending an attempt on "no backend of group ... is available" and
        pushing its next try back. True if it now waits for a probe.

        Only for such a message: new mail, and mail due by its own schedule, keep
        waiting out `fail_timeout` (a probe per message would defeat the down-mark).
        """
        now = time.time()
        if not any(b.is_down(now) for b in self.upstreams.backends):
            return False  # the common case: no envelope read
        try:
            env = Envelope.from_bytes(self.spool.envelope_bytes(QUEUE, queue_id))
        except (OSError, ValueError):
            return False  # gone, or for the claim to quarantine
        if env.next_attempt <= due + _EARLY:
            return False  # due by the relay's own schedule
        groups = set(self.upstreams.partition(env))
        if not groups or not all(self.upstreams.all_down(group, now) for group in groups):
            return False
        with self._cond:
            for group in groups:
                self._flushed.setdefault(group, set()).add(queue_id)
                if not self.upstreams.probing(group):
                    self.upstreams.request_probe(group)
            self._cond.notify()  # the scheduler thread starts the probes
        return True

    def _rebuild_waiting(self) -> None:
        """After a restart, find mail deferred because a group's backends were down, and
        probe those groups at once instead of waiting out each message's backoff."""
        now = time.time()
        groups: set[str] = set()
        for queue_id, due in self.spool.scan(QUEUE):
            if due <= now or self._stopping.is_set():
                continue
            waiting = self._waiting_groups_of(queue_id)
            if waiting:
                self._wait_for_groups(queue_id, waiting)
                groups.update(waiting)
        for group in groups:
            self.upstreams.request_probe(group)
        with self._cond:
            self._cond.notify()

    def _waiting_groups_of(self, queue_id: str) -> set[str]:
        """The groups a queued message waits for, read without parsing the whole
        envelope unless it waits for any (most deferred mail does not)."""
        try:
            data = self.spool.envelope_bytes(QUEUE, queue_id)
        except (OSError, ValueError):
            return set()  # gone, or not a file: the claim will see to it
        if b'"waiting_groups":[]' in data:
            return set()
        try:
            return set(Envelope.from_bytes(data).waiting_groups)
        except ValueError:
            return set()  # corrupt: the claim will quarantine it
