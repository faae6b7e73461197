"""`smarthost queue`: see and steer the spool, safely while the relay runs.

Every change is one atomic rename, or a touch of a queue file's mtime (its due time),
which the running relay notices through its watcher: no signal, no socket. A message
a worker is delivering (in active/) is never held, deleted or bounced under it: the
command waits for that attempt to end, then acts on what is left.
"""

from __future__ import annotations

import bisect
import builtins
import json
import logging
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import drop, dsn, headers, log
from .bounce import Bouncer
from .config import Config
from .rewrite import domain_of
from .spool import (
    ACTIVE,
    DEFERRED,
    DROP,
    FAILED,
    FAILED_RCPT,
    HOLD,
    PENDING,
    QUEUE,
    TMP,
    CorruptEnvelope,
    Envelope,
    Recipient,
    Spool,
)

BUSY_WAIT = 30.0  # how long to wait for an attempt in flight to end
CANCELLED = "550 5.0.0 delivery cancelled by the administrator"


_STATE_WORDS: dict[str, str] = {
    QUEUE: "waiting",
    ACTIVE: "being delivered",
    HOLD: "held",
    FAILED: "failed",
}


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
        words: dict[str, str] = {HOLD: "held", FAILED: "failed", ACTIVE: "active"}
        return words[self.state]

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


class Unreadable(Exception):
    """A spool entry under a queue-ID name that is not a readable envelope."""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class Dropped:
    """A local submission still waiting in drop/ for the relay's pickup (the relay is
    stopped, or about to take it). It has no queue ID yet: its `id` is the drop file's
    32 hex digits."""

    entry: drop.Entry
    status = "dropped"

    def as_json(self) -> dict:
        entry = self.entry
        return {
            "id": entry.id,
            "state": self.status,
            "arrival": log.rfc3339(entry.arrival),
            "size": entry.size,
            "sender": entry.sender,
            "recipients": [
                {"address": address, "state": PENDING, "reply": None}
                for address in entry.recipients
            ],
            "attempts": 0,
            "next_attempt": None,
            "last_error": None,
            "submitted_by": entry.owner,
        }


class QueueControl:
    """The queue commands, acting on the spool directly.

    Garbage under a queue-ID name (a link, a directory, a FIFO, a cut or corrupt
    envelope, a file it may not read) never stops a command: each one is named on
    `err` (stderr) and the command goes on with the good entries (SPEC §9).
    """

    # Annotations in this class say builtins.list: the `list` method shadows the builtin.

    def __init__(
        self,
        config: Config,
        out: Callable[[str], None] = print,
        err: Callable[[str], None] = _to_stderr,
    ) -> None:
        self.config = config
        self.spool = Spool(config.spool.dir)
        self.out = out
        self.err = err
        self.unreadable = 0  # entries named on `err` so far

    # -- looking -------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every readable envelope, by state; each unreadable one is named on `err`."""
        for state in (ACTIVE, QUEUE, HOLD, FAILED):
            for queue_id in sorted(self.spool.each_name(state)):
                try:
                    yield self._read(state, queue_id)
                except FileNotFoundError:
                    continue  # moved on while we looked: seen in its next state, or done
                except Unreadable as exc:
                    self._name_unreadable(state, queue_id, str(exc))

    def _read(self, state: str, queue_id: str) -> Entry:
        """The entry `state/queue_id`; Unreadable with the reason if it is not one.

        Only a regular file is opened: a FIFO would block the command, a link would be
        followed to a file that is not the spool's."""
        st = self.spool.entry_stat(state, queue_id)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{_file_kind(st.st_mode)}, not an envelope")
        try:
            env = self.spool.read_envelope(state, queue_id)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(queue_id) from None  # replaced while we looked
        except CorruptEnvelope as exc:
            raise Unreadable(f"unreadable envelope: {exc}") from None
        except ValueError as exc:  # what Envelope.from_bytes lets through
            raise Unreadable(f"unreadable envelope: {exc}") from None
        except OSError as exc:
            raise Unreadable(f"cannot read: {exc.strerror or exc}") from None
        return Entry(state, env, st.st_mtime)

    def _name_unreadable(self, state: str, queue_id: str, reason: str) -> None:
        self.unreadable += 1
        self.err(f"smarthost: queue: {state}/{queue_id}: {reason}")

    def dropped(self) -> builtins.list[Dropped]:
        """Local submissions waiting in drop/; each file there that is not one is named
        on `err` (the relay's pickup sets it aside in corrupt/)."""
        listing = drop.list_entries(self.spool)
        for name, reason in listing.problems:
            self.unreadable += 1
            self.err(f"smarthost: queue: {DROP}/{name}: {reason}")
        return [Dropped(entry) for entry in listing.entries]

    def list(self, as_json: bool = False) -> int:
        # drop/ first: the pickup queues a message before it removes its drop file, so
        # one that moves on meanwhile is listed twice at worst, never missed.
        dropped = self.dropped()
        entries = list(self.entries())
        if as_json:
            listed: tuple[Entry | Dropped, ...] = (*entries, *dropped)
            for item in listed:
                self.out(json.dumps(item.as_json(), ensure_ascii=False))
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
        for item in dropped:
            sub = item.entry
            self.out(
                f"{sub.id}  {item.status:<8} {_age(now - sub.arrival):>6} {sub.size:>9}  "
                f"{sub.sender or '<>'}"
            )
            for address in sub.recipients:
                self.out(f"    {address}  {PENDING}")
            self.out(f"    submitted by {sub.owner}, waiting in {DROP}/ for the relay")
        count = len(entries) + len(dropped)
        line = f"-- {count} message{'s' if count != 1 else ''} in the queue"
        if dropped:
            line += f" ({len(dropped)} in {DROP}/, not yet picked up)"
        if self.unreadable:
            line += f"; {self.unreadable} unreadable (named on stderr)"
        self.out(line)
        return 0

    def summary(self, by: str = "domain", as_json: bool = False, top: int | None = None) -> int:
        """The queue's shape, as Postfix's qshape: per row key (recipient domain,
        backend, or sender domain) the messages waiting in queue/ and active/ by age.

        A message counts once in each row it has unfinished recipients for (messages,
        not recipients: one mail to 500 people at one domain is one message there);
        TOTAL counts each message once, so the rows may add up to more than TOTAL.
        Held, failed and dropped are counted apart: hold/ and failed/ from their names
        and lstat() alone (never read), drop/ from each record. Envelopes are read one
        at a time; the age is from the envelope's arrival."""
        key_of = _SUMMARY_KEYS[by]
        now = time.time()
        rows: dict[str, builtins.list[int]] = {}
        total = [0] * len(SUMMARY_BUCKETS)
        deferred = 0
        for state in (ACTIVE, QUEUE):
            for queue_id in self.spool.each_name(state):
                try:
                    env = self._read(state, queue_id).env
                except FileNotFoundError:
                    continue  # moved on while we looked
                except Unreadable as exc:
                    self._name_unreadable(state, queue_id, str(exc))
                    continue
                unfinished = env.unfinished()
                if not unfinished:
                    continue  # all done: the relay is about to remove it
                bucket = _bucket(now - env.arrival)
                total[bucket] += 1
                if any(r.state == DEFERRED for r in unfinished):
                    deferred += 1
                for key in {key_of(env, rcpt) for rcpt in unfinished}:
                    counts = rows.get(key)
                    if counts is None:
                        counts = rows[key] = [0] * len(SUMMARY_BUCKETS)
                    counts[bucket] += 1
        apart = {"held": self._count_apart(HOLD), "failed": self._count_apart(FAILED)}
        apart["dropped"] = len(self.dropped())
        ranked = sorted(rows.items(), key=lambda item: (-sum(item[1]), item[0]))
        if top is not None:
            ranked = ranked[:top]
        if as_json:
            summary = {
                "by": by,
                "buckets": list(SUMMARY_BUCKETS),
                "rows": [
                    {"key": key, "total": sum(counts), "counts": counts} for key, counts in ranked
                ],
                "total": {"total": sum(total), "counts": total, "deferred": deferred},
                **apart,
            }
            self.out(json.dumps(summary, ensure_ascii=False))
            return 0
        header = ["T", *SUMMARY_BUCKETS]
        table = [("TOTAL", [sum(total), *total])]
        table += [(key, [sum(counts), *counts]) for key, counts in ranked]
        key_width = max(len(key) for key, _ in table)
        widths = [
            max(len(name), *(len(str(cells[n])) for _, cells in table))
            for n, name in enumerate(header)
        ]
        self.out(" ".join([" " * key_width, *(h.rjust(w) for h, w in zip(header, widths))]))
        for key, cells in table:
            numbers = (str(c).rjust(w) for c, w in zip(cells, widths))
            self.out(" ".join([key.rjust(key_width), *numbers]))
        line = f"-- deferred {deferred}, held {apart['held']}, failed {apart['failed']}"
        line += f", dropped {apart['dropped']}"
        if self.unreadable:
            line += f"; {self.unreadable} unreadable (named on stderr)"
        self.out(line)
        return 0

    def _count_apart(self, state: str) -> int:
        """The envelopes in `state`, counted from lstat() alone; an entry that is not a
        regular file is named on `err` and not counted."""
        count = 0
        for queue_id in self.spool.each_name(state):
            try:
                mode = self.spool.entry_stat(state, queue_id).st_mode
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._name_unreadable(state, queue_id, f"cannot read: {_reason(exc)}")
                continue
            if stat.S_ISREG(mode):
                count += 1
            else:
                self._name_unreadable(state, queue_id, f"{_file_kind(mode)}, not an envelope")
        return count

    def show(self, queue_id: str) -> int:
        entry = self._entry(queue_id)
        env = entry.env
        self.out(json.dumps(entry.as_json(), indent=2, ensure_ascii=False))
        self.out("history:")
        for step in env.history:
            self.out("  " + json.dumps(step, ensure_ascii=False))
        self.out("headers:")
        try:
            content = self.spool.read_message_head(queue_id)  # a large body stays on disk
        except FileNotFoundError:
            self.err(f"smarthost: queue: msg/{queue_id} is missing")
            return 1
        except (CorruptEnvelope, OSError) as exc:
            self.err(f"smarthost: queue: msg/{queue_id} cannot be read: {_reason(exc)}")
            return 1
        self.out(content[: headers.section_end(content)].decode("utf-8", "replace").rstrip())
        return 0

    # -- steering ------------------------------------------------------------

    def flush(self, queue_ids: builtins.list[str]) -> int:
        """Retry now: all waiting messages, or the ones named.

        The running relay sees the new due time; for a message whose backends are all
        marked down it probes them first, and sends if they answer (scheduler.py)."""
        if queue_ids:
            return self._each(queue_ids, self._flush_one)
        ids = [entry.env.id for entry in self.entries() if entry.state == QUEUE]
        return self._each(ids, self._flush_listed)

    def hold(self, queue_ids: builtins.list[str]) -> int:
        return self._each(queue_ids, self._hold_one)

    def release(self, queue_ids: builtins.list[str]) -> int:
        return self._each(queue_ids, self._release_one)

    def delete(self, queue_ids: builtins.list[str]) -> int:
        return self._each(queue_ids, self._delete_one)

    def bounce(self, queue_ids: builtins.list[str]) -> int:
        return self._each(queue_ids, self._bounce_one)

    def _flush_one(self, queue_id: str) -> str:
        state = self._entry(queue_id).state
        if state != QUEUE:
            hint = ": release it first" if state == HOLD else ""
            raise QueueError(f"is {_STATE_WORDS[state]}, not waiting{hint}")
        if not self._make_due(queue_id):
            raise QueueError("is no longer waiting (taken by the relay)")
        return "will be tried now"

    def _flush_listed(self, queue_id: str) -> str:
        """`flush` without IDs: a message that left queue/ since the listing was taken
        by the relay meanwhile, which is what flush asks for, not a failure."""
        if not self._make_due(queue_id):
            return "no longer waiting (taken by the relay)"
        return "will be tried now"

    def _make_due(self, queue_id: str) -> bool:
        if not self.spool.set_due(QUEUE, queue_id, time.time()):
            return False
        log.event("flushed", queue_id=queue_id)
        return True

    def _hold_one(self, queue_id: str) -> str:
        self._entry(queue_id)
        self._take(queue_id, (QUEUE,), HOLD)
        log.event("held", queue_id=queue_id)
        return "held"

    def _release_one(self, queue_id: str) -> str:
        if self._entry(queue_id).state != HOLD:
            raise QueueError("is not held")
        # Due now, before it becomes visible to the relay.
        if not self.spool.set_due(HOLD, queue_id, time.time()):
            raise QueueError("is not held")
        if not self.spool.move(queue_id, HOLD, QUEUE):
            raise QueueError("is not held")
        self.spool.announce(queue_id)
        log.event("released", queue_id=queue_id, by="administrator")
        return "released"

    def _delete_one(self, queue_id: str) -> str:
        self._entry(queue_id)  # garbage under a queue-ID name is not ours to delete
        state = self._take(queue_id, (QUEUE, HOLD, FAILED), TMP)
        self.spool.discard(queue_id, TMP)
        log.event("deleted", queue_id=queue_id, state=state)
        return "deleted"

    def _bounce_one(self, queue_id: str) -> str:
        self._entry(queue_id)
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
            rcpt.remote_mta = None  # this relay's own decision: no upstream said it
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

    def _entry(self, queue_id: str) -> Entry:
        """The message `queue_id` as it is now; QueueError if it is not a readable one."""
        for _ in range(3):  # it may move from one state to the next while we look
            for state in (QUEUE, ACTIVE, HOLD, FAILED):
                try:
                    return self._read(state, queue_id)
                except FileNotFoundError:
                    continue
                except Unreadable as exc:
                    raise QueueError(f"is unreadable in {state}/: {exc}") from None
        raise QueueError("not in the queue")

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

    def _each(self, queue_ids: builtins.list[str], action: Callable[[str], str]) -> int:
        failures = 0
        for queue_id in queue_ids:
            try:
                self.out(f"{queue_id}: {action(queue_id)}")
            except QueueError as exc:
                self.out(f"{queue_id}: {exc}")
                failures += 1
        return 1 if failures else 0


# qshape's age buckets, doubling from 5 minutes: the upper bound of each, in seconds.
SUMMARY_BUCKETS = ("0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160-320m", "320m+")
_BUCKET_ENDS = tuple(minutes * 60 for minutes in (5, 10, 20, 40, 80, 160, 320))


def _bucket(age: float) -> int:
    """The bucket of a message `age` seconds old: 0-5m is [0, 5m), 320m+ is [320m, ...);
    an arrival in the future (a clock set back) is 0-5m."""
    return bisect.bisect_right(_BUCKET_ENDS, age)


_SUMMARY_KEYS: dict[str, Callable[[Envelope, Recipient], str]] = {
    "domain": lambda env, rcpt: domain_of(rcpt.address) or "-",
    "backend": lambda env, rcpt: rcpt.backend or "-",
    "sender": lambda env, rcpt: domain_of(env.sender) or "-" if env.sender else "<>",
}


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
