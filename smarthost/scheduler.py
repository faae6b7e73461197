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
from datetime import datetime, timezone

from . import log, retry
from .config import Config
from .sender import Attempt, Sender
from .spool import ACTIVE, FAILED_RCPT, QUEUE, Envelope, Spool

RESCAN_INTERVAL = 10.0
HISTORY_KEPT = 20
# A queue file's mtime is its due time; allow for the coarse clock file times use.
_CLOCK_SLACK = 0.05


class Scheduler:
    """Hands due messages to a pool of sender threads and settles each attempt."""

    def __init__(self, config: Config, spool: Spool, sender: Sender) -> None:
        self.config = config
        self.spool = spool
        self.sender = sender
        self._heap: list[tuple[float, str]] = []
        self._index: dict[str, float] = {}
        self._cond = threading.Condition()
        self._work: queue.Queue[str | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._stopping = threading.Event()
        self._scan_requested = True
        self._thread: threading.Thread | None = None

    # -- hints from outside --------------------------------------------------

    def notify(self, queue_id: str, due: float | None = None) -> None:
        """A message may be due at `due` (None: read its due time from the spool)."""
        if due is None:
            try:
                due = os.stat(self.spool.path(QUEUE, queue_id)).st_mtime
            except FileNotFoundError:
                return
        with self._cond:
            known = self._index.get(queue_id)
            if known is not None and known <= due:
                return  # an earlier hint stands: a late one must not push it back
            self._index[queue_id] = due
            heapq.heappush(self._heap, (due, queue_id))
            self._cond.notify()

    def submit(self, env: Envelope) -> None:
        """A newly committed message: send it now."""
        self.notify(env.id, 0.0)

    def request_scan(self) -> None:
        with self._cond:
            self._scan_requested = True
            self._cond.notify()

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.config.delivery.workers):
            thread = threading.Thread(target=self._worker, name=f"sender-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)
        self._idle = len(self._workers)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 5.0) -> bool:
        """Stop dispatching; wait up to `grace` seconds for attempts in flight."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for _ in self._workers:
            self._work.put(None)
        deadline = time.monotonic() + grace
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        # A worker still stuck on an upstream leaves its message in active/,
        # which the next start hands back to the queue.
        return not any(t.is_alive() for t in self._workers)

    # -- the dispatch loop -----------------------------------------------------

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stopping.is_set():
            now = time.time()
            if self._scan_requested or now >= next_scan:
                self._scan_requested = False
                self._scan()
                self.sender.upstreams.close_idle()
                next_scan = now + RESCAN_INTERVAL
            with self._cond:
                self._dispatch_due(now)
                self._cond.wait(self._sleep_time(now, next_scan))

    def _dispatch_due(self, now: float) -> None:
        while self._idle > 0 and self._heap and self._heap[0][0] <= now:
            due, queue_id = heapq.heappop(self._heap)
            if self._index.get(queue_id) != due:
                continue  # superseded by a later hint
            del self._index[queue_id]
            self._idle -= 1
            self._work.put(queue_id)

    def _sleep_time(self, now: float, next_scan: float) -> float:
        wait = next_scan - now
        if self._idle > 0 and self._heap:
            wait = min(wait, self._heap[0][0] - now)
        return max(0.0, wait)

    def _scan(self) -> None:
        for queue_id, due in self.spool.scan(QUEUE):
            self.notify(queue_id, due)

    def _worker(self) -> None:
        while True:
            queue_id = self._work.get()
            if queue_id is None:
                return
            try:
                self._process(queue_id)
            except Exception as exc:  # a bug or a disk fault must not kill the worker
                log.event("spool_error", level=logging.ERROR, queue_id=queue_id, error=repr(exc))
                self._rescue(queue_id)
            finally:
                with self._cond:
                    self._idle += 1
                    self._cond.notify()

    def _rescue(self, queue_id: str) -> None:
        """Put a message whose attempt broke back in the queue, to be tried again later.

        Its envelope may predate the attempt, so a recipient delivered just now may be
        sent twice: at-least-once, never lost.
        """
        due = time.time() + self.config.delivery.retry_min
        try:
            # Stamp the due time first: once in queue/ it must not look due at once.
            os.utime(self.spool.path(ACTIVE, queue_id), (due, due))
            if self.spool.move(queue_id, ACTIVE, QUEUE):
                self.notify(queue_id, due)
        except FileNotFoundError:
            pass  # it never got claimed, or was already settled
        except OSError as exc:
            log.event("spool_error", level=logging.ERROR, queue_id=queue_id, error=repr(exc))

    # -- one message -----------------------------------------------------------

    def _process(self, queue_id: str) -> None:
        if self._stopping.is_set():
            return  # stays queued for the next start
        try:
            due = os.stat(self.spool.path(QUEUE, queue_id)).st_mtime
        except FileNotFoundError:
            return  # taken by someone else (queue command) or already done
        if due > time.time() + _CLOCK_SLACK:
            self.notify(queue_id, due)  # a stale hint: not due yet
            return
        env = self.spool.claim(queue_id)
        if env is None:
            return
        try:
            attempt = self.sender.attempt(env)
        except FileNotFoundError:
            self.spool.quarantine(env.id, "active", "message content is missing")
            return
        self.settle(env, attempt)

    def settle(self, env: Envelope, attempt: Attempt) -> None:
        """Record an attempt on disk and in the log, then requeue, finish or park."""
        now = time.time()
        env.attempts += 1
        self._log_attempt(env, attempt, now)
        unfinished = env.unfinished()
        if unfinished:
            if attempt.deferred:
                env.last_error = attempt.deferred[-1].reply
            due = retry.next_attempt(
                now,
                env.arrival,
                env.attempts,
                self.config.delivery.retry_min,
                self.config.delivery.retry_max,
                self.config.delivery.retry_for,
            )
            if due is not None:
                env.next_attempt = due
                self.spool.requeue(env)
                log.event(
                    "deferred",
                    queue_id=env.id,
                    sender=env.sender,
                    recipients=[r.address for r in unfinished],
                    reply=env.last_error,
                    status=unfinished[-1].status,
                    attempt=env.attempts,
                    delay=round(now - env.arrival, 3),
                    next_attempt=_rfc3339(due),
                    backend=attempt.backend,
                    backend_errors=[f"{b}: {r}" for b, r in attempt.backend_errors] or None,
                )
                self.notify(env.id, due)
                return
            self._expire(env, unfinished, now)
        if any(r.state == FAILED_RCPT for r in env.recipients):
            # Until DSNs are generated, a message someone must hear about is kept
            # in failed/ for a human, never dropped.
            self.spool.park_failed(env)
        else:
            self.spool.finish(env)

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
        common = {"queue_id": env.id, "attempt": env.attempts, "delay": round(now - env.arrival, 3)}
        if attempt.delivered:
            log.event(
                "delivered",
                recipients=[r.address for r in attempt.delivered],
                backend=attempt.backend,
                reply=attempt.delivered[-1].reply,
                status=attempt.delivered[-1].status,
                message_id=env.message_id,
                **common,
            )
        for rcpt in attempt.failed:
            log.event(
                "failed",
                level=logging.WARNING,
                recipient=rcpt.address,
                sender=env.sender,
                backend=attempt.backend,
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


def _last_reply(attempt: Attempt) -> str | None:
    touched = attempt.deferred or attempt.failed or attempt.delivered
    return touched[-1].reply if touched else None


def _rfc3339(timestamp: float) -> str:
    """The same form as each log line's `time`."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()
