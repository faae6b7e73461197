"""The queue manager: what is due, who sends it, and what happens after each attempt.

An in-memory index (queue ID → due time, with a heap) says what to send next. It is
only a cache: a scan of queue/ rebuilds it at start and every RESCAN_INTERVAL, and
every event (a commit by the receiver, a file the watcher saw) merely adds a hint.
A message is handed to a worker only while a worker is free, so claimed (active/)
mail is never more than the pool can carry.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import threading
import time
from typing import TypedDict

from . import dsn, log, retry
from .bounce import Bouncer
from .config import Config
from .sender import (
    SESSION_ERRORS,
    Attempt,
    BackendFailure,
    Sender,
    describe_failure,
    format_reply,
)
from .spool import ACTIVE, DEFERRED, FAILED_RCPT, QUEUE, CorruptEnvelope, Envelope, Spool
from .upstream import Backend, Upstreams

RESCAN_INTERVAL = 10.0
STRAY_ACTIVE_AGE = 120.0  # longer than a queue command waits for an attempt
HISTORY_KEPT = 20
# A queue file's mtime is its due time; allow for the coarse clock file times use.
_CLOCK_SLACK = 0.05
# Due this much before the envelope's own next_attempt: made due by an administrator
# (`queue flush`, `queue release`), not by the relay's schedule.
_EARLY = 1.0


class _AttemptFields(TypedDict):
    """The log fields every outcome of one attempt carries."""

    queue_id: str
    attempt: int
    delay: float


class Scheduler:
    """Hands due messages to a pool of sender threads and settles each attempt."""

    def __init__(self, config: Config, spool: Spool, sender: Sender) -> None:
        self.config = config
        self.spool = spool
        self.sender = sender
        self.upstreams = sender.upstreams
        self.bouncer = Bouncer(config, spool, self.submit)
        self.upstreams.on_up = self.release
        self._waiting: dict[str, set[str]] = {}  # group -> queue IDs waiting for it
        self._flushed: dict[str, set[str]] = {}  # group -> flushed IDs waiting for its probe
        self._claimed: set[str] = set()  # in active/ because a worker of ours took it
        self._rescued: dict[str, tuple[Envelope, int]] = {}  # see _rescue
        self._released: set[str] = set()  # due now, whatever their files' mtime says
        self._probes: list[threading.Thread] = []
        self._rebuilder: threading.Thread | None = None
        self._heap: list[tuple[float, str]] = []
        self._index: dict[str, float] = {}
        self._cond = threading.Condition()
        self._work: queue.Queue[str | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def use(self, config: Config, upstreams: Upstreams) -> None:
        """A reloaded config; mail waiting for a group is released by the new backends."""
        upstreams.on_up = self.release
        self.config, self.upstreams = config, upstreams
        self.bouncer.config = config
        with self._cond:
            groups = set(self._waiting) | set(self._flushed)
            self._cond.notify()
        for group in groups:
            upstreams.request_probe(group)

    # -- hints from outside --------------------------------------------------

    def notify(self, queue_id: str, due: float | None = None) -> None:
        """A message may be due at `due` (None: read its due time from the spool)."""
        if due is None:
            try:
                due = _lstat(self.spool.path(QUEUE, queue_id)).st_mtime
            except FileNotFoundError:
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
                self._dispatch_due(now)
                if not self._times_probes():
                    return
            self._cond.notify()

    def submit(self, env: Envelope) -> None:
        """A newly committed message: send it now."""
        self.notify(env.id, 0.0)

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
        others = [t for t in (self._rebuilder, *self._probes) if t is not None]
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
            next_scan = now + RESCAN_INTERVAL
        self._start_probes(now)
        with self._cond:
            self._dispatch_due(now)
            self._cond.wait(self._sleep_time(now, next_scan))
        return next_scan

    def _reclaim_stray_active(self, now: float) -> None:
        """An envelope in active/ that no worker of ours holds goes back to the queue:
        at once while no queue command may be holding it (a delivery process that
        died left it there), else once it is clearly abandoned."""
        with self.spool.no_command_claims() as nobody_else:
            for queue_id, _ in list(self.spool.scan(ACTIVE)):
                with self._cond:
                    if queue_id in self._claimed:
                        continue
                try:
                    moved_in = _lstat(self.spool.path(ACTIVE, queue_id)).st_ctime  # the rename
                except FileNotFoundError:
                    continue
                if (nobody_else or now - moved_in > STRAY_ACTIVE_AGE) and self.spool.move(
                    queue_id, ACTIVE, QUEUE
                ):
                    self.notify(queue_id)

    def _dispatch_due(self, now: float) -> None:
        while self._idle > 0:
            queue_id = self._pop_due(now)
            if queue_id is None:
                return
            self._idle -= 1
            self._work.put(queue_id)

    def _pop_due(self, now: float) -> str | None:
        """Take the earliest message due by `now` off the heap (with `_cond` held)."""
        while self._heap and self._heap[0][0] <= now:
            due, queue_id = heapq.heappop(self._heap)
            if self._index.get(queue_id) != due:
                continue  # superseded by a later hint
            del self._index[queue_id]
            return queue_id
        return None

    def _sleep_time(self, now: float, next_scan: float) -> float:
        wait = next_scan - now
        if self._idle > 0 and self._heap:
            wait = min(wait, self._heap[0][0] - now)
        probe = self.upstreams.next_probe()
        if probe is not None:
            wait = min(wait, probe - now)
        return max(0.0, wait)

    def _scan(self) -> None:
        """Hint every queued message the index lacks. A message it holds keeps its
        hint (a touch reaches the watcher), so a long queue costs a directory read,
        not a stat per message."""
        with self._cond:
            known = set(self._index)
        for queue_id in self.spool.names(QUEUE) - known:
            try:
                due = _lstat(self.spool.path(QUEUE, queue_id)).st_mtime
            except FileNotFoundError:
                continue  # claimed or moved while we looked
            self.notify(queue_id, due)

    def _worker(self) -> None:
        queue_id = self._work.get()
        while queue_id is not None:
            try:
                self._process(queue_id)
            finally:
                queue_id = self._next_work()

    def _next_work(self) -> str | None:
        """After an attempt: a message already due is this worker's at once; else it
        waits for the scheduler (woken only if it has something to time)."""
        with self._cond:
            queue_id = None if self._stopping.is_set() else self._pop_due(time.time())
            if queue_id is not None:
                return queue_id
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
            os.utime(self.spool.path(ACTIVE, queue_id), (due, due), follow_symlinks=False)
            if self.spool.move(queue_id, ACTIVE, QUEUE):
                self.notify(queue_id, due)
        except FileNotFoundError:
            # Never claimed (the claim itself failed): still in queue/, and no hint is
            # left for it before the next rescan.
            if os.path.lexists(self.spool.path(QUEUE, queue_id)):
                self.notify(queue_id, due)
        except OSError as exc:
            log.event("spool_error", level=logging.ERROR, queue_id=queue_id, error=repr(exc))

    # -- one message -----------------------------------------------------------

    def _process(self, queue_id: str) -> None:
        if self._stopping.is_set():
            return  # stays queued for the next start
        with self._cond:
            released = queue_id in self._released
            self._released.discard(queue_id)
        try:
            due = _lstat(self.spool.path(QUEUE, queue_id)).st_mtime
        except FileNotFoundError:
            return  # taken by someone else (queue command) or already done
        if due > time.time() + _CLOCK_SLACK and not released:
            self.notify(queue_id, due)  # a stale hint: not due yet
            return
        if not released and self._probe_first(queue_id, due):
            return  # sent when the probe is done
        with self._cond:
            self._claimed.add(queue_id)
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
            self.settle(env, attempt)
            self._rescued.pop(queue_id, None)
        except Exception as exc:  # a full disk or a bug must not kill the worker
            self._rescue(queue_id, env, exc)
        finally:
            with self._cond:
                self._claimed.discard(queue_id)

    def settle(self, env: Envelope, attempt: Attempt) -> None:
        """Record an attempt on disk and in the log, tell whoever must be told, then
        requeue, finish or keep the message."""
        now = time.time()
        if attempt.progressed:
            env.attempts += 1
            self._log_attempt(env, attempt, now)
        unfinished = env.unfinished()
        due = self._next_due(env, attempt, now) if unfinished else None
        if unfinished and due is None:
            self._expire(env, unfinished, now)
        # Reports are committed before the message moves on: a crash in between
        # repeats a report, never loses one.
        self._report_failures(env)
        if attempt.relayed:
            self.bouncer.report(env, dsn.RELAYED, attempt.relayed, now)
        if due is not None:
            self._requeue(env, attempt, unfinished, due, now)
        elif not env.sender and any(r.state == FAILED_RCPT for r in env.recipients):
            self.spool.park_failed(env)  # a failed bounce: kept for a human, never deleted
        else:
            self.spool.finish(env)

    def _report_failures(self, env: Envelope) -> None:
        """One DSN for every failure not yet reported (this attempt's, or a broken
        earlier attempt's), or a double bounce for a `<>` message."""
        failed = [r for r in env.recipients if r.state == FAILED_RCPT and not r.reported]
        if not failed:
            return
        if env.sender:
            self.bouncer.report(env, dsn.FAILED, failed)
        else:
            self.bouncer.double_bounce(env, failed)
        for rcpt in failed:
            rcpt.reported = True

    def _next_due(self, env: Envelope, attempt: Attempt, now: float) -> float | None:
        """A rate-limit slot if one is booked, else the backoff; None once expired."""
        delivery = self.config.delivery
        due = retry.next_attempt(
            now,
            env.arrival,
            max(1, env.attempts),
            delivery.retry_min,
            delivery.retry_max,
            delivery.retry_for,
        )
        if due is not None and attempt.rate_wait is not None:
            due = min(attempt.rate_wait, env.arrival + delivery.retry_for)
        if due is not None and self._group_came_back(attempt):
            due = now  # a backend answered again while this attempt failed over
        return due

    def _group_came_back(self, attempt: Attempt) -> bool:
        return any(
            self.upstreams.last_success.get(group, 0.0) > attempt.started
            for group in attempt.waiting_groups
        )

    def _requeue(
        self, env: Envelope, attempt: Attempt, unfinished: list, due: float, now: float
    ) -> None:
        env.next_attempt = due
        env.waiting_groups = sorted(attempt.waiting_groups)
        if attempt.deferred:
            env.last_error = attempt.deferred[-1].reply
        warn_after = self.config.delivery.warn_after
        if warn_after and not env.warned and now - env.arrival >= warn_after:
            # Once per message: the sender learns it is late, and until when we try.
            late = [r for r in unfinished if r.state == DEFERRED]
            self.bouncer.report(env, dsn.DELAYED, late, now)
            env.warned = True
        self.spool.requeue(env)
        self._wait_for_groups(env.id, attempt.waiting_groups)
        if self._group_came_back(attempt):
            self.release_one(env.id)  # a probe succeeded while this was being settled
        if attempt.progressed:
            log.event(
                "deferred",
                queue_id=env.id,
                sender=env.sender,
                recipients=[r.address for r in unfinished],
                reply=env.last_error,
                status=unfinished[-1].status,
                attempt=env.attempts,
                delay=round(now - env.arrival, 3),
                next_attempt=log.rfc3339(due),
                backend=attempt.backend,
                backend_errors=[f"{b}: {r}" for b, r in attempt.backend_errors] or None,
                tried=[b for b, _ in attempt.backend_errors] or None,  # names, for metrics
            )
        self.notify(env.id, due)

    # -- fast recovery ---------------------------------------------------------

    def _wait_for_groups(self, queue_id: str, groups: set[str]) -> None:
        with self._cond:
            for group in groups:
                self._waiting.setdefault(group, set()).add(queue_id)

    def release_one(self, queue_id: str) -> None:
        """Make a waiting message due now, whatever its due time on disk says.

        Only in memory: after a restart the waiting index is rebuilt and the group
        probed again, so nothing is lost, and 100,000 messages released at once cost
        no file operation each.
        """
        with self._cond:
            self._released.add(queue_id)
        self.notify(queue_id, time.time())

    def release(self, group: str) -> None:
        """A backend of `group` answers again: mail that waited only for it goes now."""
        with self._cond:
            waiting = self._waiting.pop(group, set()) | self._flushed.pop(group, set())
        for queue_id in waiting:
            self.release_one(queue_id)
        if waiting:
            log.event("released", group=group, messages=len(waiting))

    def _probe(self, backend: Backend) -> None:
        """Open a session to a down backend; its success releases the waiting mail."""
        try:
            with backend.session(self.sender.connect) as session:
                code, msg = session.smtp.noop()
                if code != 250:
                    raise BackendFailure(format_reply(code, msg))
        except (BackendFailure, *SESSION_ERRORS) as exc:
            self.upstreams.failed(backend, describe_failure(exc), time.time())
        else:
            self.upstreams.succeeded(backend)  # releases the group's mail, flushed too
        finally:
            self.upstreams.probe_done(backend)
            flushed: set[str] = set()
            with self._cond:
                if not self.upstreams.probing(backend.group):
                    # Every probe failed: the flushed mail gets the attempt it was
                    # asked for (deferred, as the backends are still down).
                    flushed = self._flushed.pop(backend.group, set())
                self._cond.notify()
            for queue_id in flushed:
                self.release_one(queue_id)

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

    def _start_probes(self, now: float) -> None:
        for backend in self.upstreams.probes_due(now):
            thread = threading.Thread(
                target=self._probe, args=(backend,), name=f"probe-{backend.name}", daemon=True
            )
            self._probes = [t for t in self._probes if t.is_alive()] + [thread]
            thread.start()

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

    def _expire(self, env: Envelope, unfinished: list, now: float) -> None:
        for rcpt in unfinished:
            rcpt.state, rcpt.status = FAILED_RCPT, "4.4.7"
            rcpt.updated = now
        log.event(
            "expired",
            level=logging.WARNING,
            queue_id=env.id,
            recipients=[r.address for r in unfinished],
            reply=env.last_error,
            status="4.4.7",
            attempt=env.attempts,
            delay=round(now - env.arrival, 3),
        )

    def _log_attempt(self, env: Envelope, attempt: Attempt, now: float) -> None:
        common: _AttemptFields = {
            "queue_id": env.id,
            "attempt": env.attempts,
            "delay": round(now - env.arrival, 3),
        }
        by_backend: dict[str | None, list] = {}
        for rcpt in attempt.delivered:
            by_backend.setdefault(rcpt.backend, []).append(rcpt)
        for backend, rcpts in by_backend.items():
            log.event(
                "delivered",
                recipients=[r.address for r in rcpts],
                backend=backend,
                reply=rcpts[-1].reply,
                status=rcpts[-1].status,
                message_id=env.message_id,
                **common,
            )
        for rcpt in attempt.failed:
            log.event(
                "failed",
                level=logging.WARNING,
                recipient=rcpt.address,
                sender=env.sender,
                backend=rcpt.backend,
                reply=rcpt.reply,
                status=rcpt.status,
                **common,
            )
        env.history.append(
            {
                "time": now,
                "backend": attempt.backend,
                "delivered": [r.address for r in attempt.delivered],
                "deferred": [r.address for r in attempt.deferred],
                "failed": [r.address for r in attempt.failed],
                "reply": _last_reply(attempt),
                "backend_errors": attempt.backend_errors,
            }
        )
        del env.history[:-HISTORY_KEPT]


def _lstat(path: str) -> os.stat_result:
    """A spool entry's own times: never those of what a link planted there points to
    (nor ELOOP for a link to itself); the claim sets such garbage aside."""
    return os.stat(path, follow_symlinks=False)


def _last_reply(attempt: Attempt) -> str | None:
    touched = attempt.deferred or attempt.failed or attempt.delivered
    return touched[-1].reply if touched else None
