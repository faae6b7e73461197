"""After an attempt: what becomes of the message.

The sender has set each recipient's state on the envelope; here the attempt is logged
and kept in the envelope's history, failures are reported (a DSN, or a double bounce
for a `<>` message), a message past `retry_for` expires, one "delayed" DSN goes out
after `warn_after`, and the message is requeued for its next attempt, finished, or
parked in failed/ for a human. Reports are committed before the message moves on, so
a crash in between repeats a report and never loses one.

No threads and no in-memory index: the scheduler acts on what `settle` returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TypedDict

from . import dsn, log, retry
from .bounce import Bouncer
from .config import Config
from .sender import Attempt
from .spool import DEFERRED, FAILED_RCPT, Envelope, Recipient, Spool
from .upstream import Upstreams

HISTORY_KEPT = 20


@dataclass(frozen=True)
class Requeued:
    """A message put back in queue/: due at `due`; `waiting_groups` had every backend
    down; `group_came_back`: one of them answered while this attempt failed over."""

    due: float
    waiting_groups: frozenset[str]
    group_came_back: bool


class _AttemptFields(TypedDict):
    """The log fields every outcome of one attempt carries."""

    queue_id: str
    attempt: int
    delay: float


class Outcome:
    """Settles attempts on disk and in the log: requeue, finish, park; DSNs; expiry."""

    def __init__(self, config: Config, spool: Spool, upstreams: Upstreams, bouncer: Bouncer):
        self.config = config
        self.spool = spool
        self.upstreams = upstreams
        self.bouncer = bouncer

    def reload(self, config: Config, upstreams: Upstreams) -> None:
        self.config, self.upstreams = config, upstreams
        self.bouncer.config = config

    def settle(self, env: Envelope, attempt: Attempt, now: float | None = None) -> Requeued | None:
        """Record `attempt` and move the message on; a Requeued if it waits again."""
        now = time.time() if now is None else now
        if attempt.progressed:
            env.attempts += 1
            self._log_attempt(env, attempt, now)
        unfinished = env.unfinished()
        due = self.next_due(env, attempt, now) if unfinished else None
        if unfinished and due is None:
            _expire(env, unfinished, now)
        self._report_failures(env)
        if attempt.relayed:
            self.bouncer.report(env, dsn.RELAYED, attempt.relayed, now)
        if due is not None:
            return self._requeue(env, attempt, unfinished, due, now)
        if not env.sender and any(r.state == FAILED_RCPT for r in env.recipients):
            self.spool.park_failed(env)  # a failed bounce: kept for a human, never deleted
        else:
            self.spool.finish(env)
        return None

    def next_due(self, env: Envelope, attempt: Attempt, now: float) -> float | None:
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
        if due is not None and self.group_came_back(attempt):
            due = now  # a backend answered again while this attempt failed over
        return due

    def group_came_back(self, attempt: Attempt) -> bool:
        return any(
            self.upstreams.last_success.get(group, 0.0) > attempt.started
            for group in attempt.waiting_groups
        )

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

    def _requeue(
        self, env: Envelope, attempt: Attempt, unfinished: list[Recipient], due: float, now: float
    ) -> Requeued:
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
        # Asked after the requeue: a probe may have succeeded while this was settled.
        return Requeued(due, frozenset(attempt.waiting_groups), self.group_came_back(attempt))

    def _log_attempt(self, env: Envelope, attempt: Attempt, now: float) -> None:
        common: _AttemptFields = {
            "queue_id": env.id,
            "attempt": env.attempts,
            "delay": round(now - env.arrival, 3),
        }
        by_backend: dict[str | None, list[Recipient]] = {}
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


def _expire(env: Envelope, unfinished: list[Recipient], now: float) -> None:
    """Every unfinished recipient fails with 4.4.7: `retry_for` has passed."""
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


def _last_reply(attempt: Attempt) -> str | None:
    touched = attempt.deferred or attempt.failed or attempt.delivered
    return touched[-1].reply if touched else None
