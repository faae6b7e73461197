"""`smarthost queue`: see and steer the spool, safely while the relay runs.

Every change is one atomic rename, or a touch of a queue file's mtime (its due time),
which the running relay notices through its watcher: no signal, no socket. A message
a worker is delivering (in active/) is never held, deleted or bounced under it: the
command waits for that attempt to end, then acts on what is left.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import dsn, headers, log
from .bounce import Bouncer
from .config import Config
from .spool import (
    ACTIVE,
    FAILED,
    FAILED_RCPT,
    HOLD,
    QUEUE,
    TMP,
    CorruptEnvelope,
    Envelope,
    Spool,
)

BUSY_WAIT = 30.0  # how long to wait for an attempt in flight to end
CANCELLED = "550 5.0.0 delivery cancelled by the administrator"


_STATE_WORDS = {QUEUE: "waiting", ACTIVE: "being delivered", HOLD: "held", FAILED: "failed"}


class QueueError(Exception):
    """A queue ID that cannot be acted on, with the reason."""


@dataclass
class Entry:
    state: str  # the directory: queue, active, hold, failed
    env: Envelope
    due: float

    @property
    def status(self) -> str:
        """queued, deferred, held, failed or active (being delivered now)."""
        if self.state == QUEUE:
            return "deferred" if self.env.attempts else "queued"
        return {HOLD: "held", FAILED: "failed", ACTIVE: "active"}[self.state]

    def as_json(self) -> dict:
        env = self.env
        return {
            "id": env.id,
            "state": self.status,
            "arrival": log.rfc3339(env.arrival),
            "size": env.size,
            "sender": env.sender,
            "recipients": [
                {"address": r.address, "state": r.state, "reply": r.reply} for r in env.recipients
            ],
            "attempts": env.attempts,
            "next_attempt": log.rfc3339(self.due) if self.state == QUEUE else None,
            "last_error": env.last_error,
        }


class QueueControl:
    """The queue commands, acting on the spool directly."""

    def __init__(self, config: Config, out: Callable[[str], None] = print) -> None:
        self.config = config
        self.spool = Spool(config.spool.dir)
        self.out = out

    # -- looking -------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        for state in (ACTIVE, QUEUE, HOLD, FAILED):
            for queue_id, due in sorted(self.spool.scan(state)):
                try:
                    yield Entry(state, self.spool.read_envelope(state, queue_id), due)
                except (FileNotFoundError, CorruptEnvelope):
                    continue  # moved on while we looked, or for the relay to quarantine

    def list(self, as_json: bool = False) -> int:
        entries = list(self.entries())
        if as_json:
            for entry in entries:
                self.out(json.dumps(entry.as_json(), ensure_ascii=False))
            return 0
        now = time.time()
        for entry in entries:
            env = entry.env
            self.out(
                f"{env.id}  {entry.status:<8} {_age(now - env.arrival):>6} {env.size:>9}  "
                f"{env.sender or '<>'}"
            )
            for rcpt in env.recipients:
                reply = f"  {rcpt.reply}" if rcpt.reply and rcpt.state != "delivered" else ""
                self.out(f"    {rcpt.address}  {rcpt.state}{reply}")
            if entry.state == QUEUE and env.attempts:
                self.out(f"    attempts {env.attempts}, next {log.rfc3339(entry.due)}")
        count = len(entries)
        self.out(f"-- {count} message{'s' if count != 1 else ''} in the queue")
        return 0

    def show(self, queue_id: str) -> int:
        state = self._locate(queue_id)
        env = self.spool.read_envelope(state, queue_id)
        entry = Entry(state, env, os.stat(self.spool.path(state, queue_id)).st_mtime)
        self.out(json.dumps(entry.as_json(), indent=2, ensure_ascii=False))
        self.out("history:")
        for step in env.history:
            self.out("  " + json.dumps(step, ensure_ascii=False))
        self.out("headers:")
        content = self.spool.read_message_head(queue_id)  # a large body stays on disk
        self.out(content[: headers.section_end(content)].decode("utf-8", "replace").rstrip())
        return 0

    # -- steering ------------------------------------------------------------

    def flush(self, queue_ids: list[str]) -> int:
        """Retry now: all waiting messages, or the ones named."""
        ids = queue_ids or [queue_id for queue_id, _ in self.spool.scan(QUEUE)]
        return self._each(ids, self._flush_one)

    def hold(self, queue_ids: list[str]) -> int:
        return self._each(queue_ids, self._hold_one)

    def release(self, queue_ids: list[str]) -> int:
        return self._each(queue_ids, self._release_one)

    def delete(self, queue_ids: list[str]) -> int:
        return self._each(queue_ids, self._delete_one)

    def bounce(self, queue_ids: list[str]) -> int:
        return self._each(queue_ids, self._bounce_one)

    def _flush_one(self, queue_id: str) -> str:
        state = self._locate(queue_id)
        if state != QUEUE:
            hint = ": release it first" if state == HOLD else ""
            raise QueueError(f"is {_STATE_WORDS[state]}, not waiting{hint}")
        now = time.time()
        # The mtime is the due time; the relay's watcher sees the change at once.
        os.utime(self.spool.path(QUEUE, queue_id), (now, now))
        log.event("flushed", queue_id=queue_id)
        return "will be tried now"

    def _hold_one(self, queue_id: str) -> str:
        self._take(queue_id, (QUEUE,), HOLD)
        log.event("held", queue_id=queue_id)
        return "held"

    def _release_one(self, queue_id: str) -> str:
        now = time.time()
        path = self.spool.path(HOLD, queue_id)
        try:
            os.utime(path, (now, now))  # due now, before it becomes visible to the relay
        except FileNotFoundError:
            raise QueueError("is not held") from None
        if not self.spool.move(queue_id, HOLD, QUEUE):
            raise QueueError("is not held")
        self.spool.announce(queue_id)
        log.event("released", queue_id=queue_id, by="administrator")
        return "released"

    def _delete_one(self, queue_id: str) -> str:
        state = self._take(queue_id, (QUEUE, HOLD, FAILED), TMP)
        self.spool.discard(queue_id, TMP)
        log.event("deleted", queue_id=queue_id, state=state)
        return "deleted"

    def _bounce_one(self, queue_id: str) -> str:
        # The relay hands back any claim in active/ that no live command holds.
        with self.spool.command_claims():
            source = self._take(queue_id, (QUEUE, HOLD), ACTIVE)
            try:
                return self._bounce_claimed(queue_id)
            except BaseException:
                # Not left in active/, where nothing would ever look at it again.
                if self.spool.move(queue_id, ACTIVE, source) and source == QUEUE:
                    self.spool.announce(queue_id)
                raise

    def _bounce_claimed(self, queue_id: str) -> str:
        env = self.spool.read_envelope(ACTIVE, queue_id)
        cancelled = env.unfinished()
        now = time.time()
        for rcpt in cancelled:
            rcpt.state, rcpt.reply, rcpt.status, rcpt.updated = FAILED_RCPT, CANCELLED, "5.0.0", now
            log.event(
                "failed",
                level=logging.WARNING,
                queue_id=queue_id,
                recipient=rcpt.address,
                sender=env.sender,
                reply=CANCELLED,
                status="5.0.0",
            )
        # Recorded before the DSN: a crash from here on repeats the report (recovery
        # finds failed, unreported recipients), and never delivers what was cancelled.
        self.spool.rewrite(env, ACTIVE)
        bouncer = Bouncer(
            self.config, self.spool, submit=lambda notice: self.spool.announce(notice.id)
        )
        if not env.sender:
            bouncer.double_bounce(env, cancelled)
            self.spool.park_failed(env)
            return "has the null sender: kept in failed/"
        dsn_id = bouncer.report(env, dsn.FAILED, cancelled, now)
        self.spool.finish(env)
        return f"bounced (DSN {dsn_id})" if dsn_id else "bounced (NOTIFY asked for no DSN)"

    # -- helpers ---------------------------------------------------------------

    def _locate(self, queue_id: str) -> str:
        state = self.spool.locate(queue_id)
        if state is None:
            raise QueueError("not in the queue")
        return state

    def _take(self, queue_id: str, sources: tuple[str, ...], target: str) -> str:
        """Move the envelope from one of `sources` to `target`, waiting out a delivery
        attempt in flight; the state it was taken from."""
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            for source in sources:
                if self.spool.move(queue_id, source, target):
                    return source
            state = self.spool.locate(queue_id)
            if state is None:
                raise QueueError("not in the queue (delivered or removed)")
            if state != ACTIVE:
                raise QueueError(f"is {_STATE_WORDS[state]}")
            if time.monotonic() > deadline:
                raise QueueError("is still being delivered; try again")
            time.sleep(0.05)  # an attempt in flight: it ends within the upstream timeouts

    def _each(self, queue_ids: list[str], action: Callable[[str], str]) -> int:
        failures = 0
        for queue_id in queue_ids:
            try:
                self.out(f"{queue_id}: {action(queue_id)}")
            except QueueError as exc:
                self.out(f"{queue_id}: {exc}")
                failures += 1
        return 1 if failures else 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
