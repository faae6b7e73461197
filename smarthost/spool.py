"""The on-disk spool: the single source of truth for every accepted message.

Layout (every directory 0700, every file 0600, owned by the service user)::

    tmp/      files being written; never visible elsewhere until complete
    msg/      ID         message content, written once, never changed
    queue/    ID         envelope of a message waiting; its mtime is the next attempt
    active/   ID         envelope claimed by a delivery worker
    hold/     ID         envelope parked by the administrator
    failed/   ID         gave up and nobody could be told: kept for a human
    corrupt/  ID.*       unreadable files, moved aside, never deleted

A message is committed with one file: its first envelope, then its content, written
into tmp/ and made durable, renamed into msg/, and hard-linked into queue/ (the
commit point); then those names are made durable. queue/ID and msg/ID are then two
names of that one file, and readers of either skip the part that is not theirs.
Messages committed together share that work (group commit): with syncfs(2), one call
for each step and the whole batch; or an fsync of each file, then one of each
directory. Where Linux has syncfs, each batch takes the way expected to cost less
(SyncChoice, which times both): a syncfs also flushes every other program's writes on
the file system, so beside a busy writer per-file fsyncs cost less.
The first change of the envelope replaces queue/ID (or active/ID) with a file of its
own, and msg/ID keeps the content. Every later state change is one rename of the
envelope between state directories, so a message is never in two states at once.
Like Postfix's deferred queue, the envelope's mtime holds its next-attempt time, so a
scan of queue/ learns every due time from stat() alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, BinaryIO, Protocol, Union

from . import headers, libc, log


class _Name(str, Enum):
    """A name that is its own plain string too: in paths, JSON and log lines."""

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]


class SpoolState(_Name):
    """Where a message's envelope is: each state is a directory, and a state change is
    one rename. Recipients have states of their own (`RcptState`)."""

    QUEUE = "queue"  # waiting for its due time (the file's mtime)
    ACTIVE = "active"  # claimed by a sender thread for one attempt
    HOLD = "hold"  # held by an administrator (`queue hold`)
    FAILED = "failed"  # a bounce that could not be delivered, kept for a human


class RcptState(_Name):
    """Where one recipient of a message stands."""

    PENDING = "pending"  # not tried yet
    DEFERRED = "deferred"  # tried, temporary failure: will be retried
    DELIVERED = "delivered"  # an upstream accepted it
    FAILED = "failed"  # permanent failure or expiry: reported to the sender


QUEUE, ACTIVE, HOLD, FAILED = SpoolState
ENVELOPE_STATES = tuple(SpoolState)
TMP, MSG, CORRUPT, DROP = "tmp", "msg", "corrupt", "drop"
DIRECTORIES = (TMP, MSG, *ENVELOPE_STATES, CORRUPT)
# Like Postfix's maildrop: any local user may add a file, nobody may list the
# directory or touch another's file (sticky); the spool root lets them through only.
DROP_MODE = 0o1733
ROOT_MODE = 0o711

PENDING, DEFERRED, DELIVERED, FAILED_RCPT = RcptState
UNFINISHED = frozenset({PENDING, DEFERRED})

ENVELOPE_VERSION = 1
# Starts a file that holds an envelope (one line of JSON) and, after it, the content:
# what a commit writes. A NUL never starts content (a Received: field always does)
# nor an envelope of its own, which is JSON.
EMBEDDED = b"\x00smarthost-envelope "
# A file system that cannot hard-link (EPERM also covers a FUSE that refuses).
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV})
LOCK_WAIT = 3.0  # seconds a new relay waits for a killed one's delivery process
# How a batch is made durable (SyncChoice): one syncfs a step, or per-file fsyncs.
# A batch's timing's share of a running cost: one batch moves it much (a busy writer
# that starts shows at once), a few make it (one stray timing does not decide).
COST_WEIGHT = 0.3
# Seconds a cost is averaged with new timings; an older one is replaced by the next
# (the way was left aside meanwhile: what it cost then says little about now).
COST_KEPT = 1.0
# Share of the time that trying the way not in use may cost. It is tried once the time
# since it was last timed, times this, outweighs how much dearer it is expected to be:
# a syncfs 0.6 s dearer (a busy writer's dirty pages) once a minute, as the 60 s rest
# after a slow syncfs used to; one a spike made 3 ms dearer after 0.3 s.
TRIAL_SHARE = 0.01
SYNCFS, FSYNC = "syncfs", "fsync"
IN_MEMORY = 256 * 1024  # bytes of a new message held in memory before going to tmp/
_ENVELOPE_READ = 65536  # an envelope is read in blocks this big (most mail is one)
LOCK_NAME = ".lock"  # in the root: held by the running relay, holds its pid
# In the root: the timeout `smarthost drain` leaves for the relay it signals; one older
# than DRAIN_REQUEST_MAX_AGE was left by a command that died, and is not taken.
DRAIN_NAME = ".drain"
DRAIN_REQUEST_MAX_AGE = 60.0
# Held shared by each queue command that claims mail; see Spool.command_claims().
_COMMANDS_LOCK_NAME = ".commands"


class SpoolError(OSError):
    """A spool operation failed; `errno` tells whether the disk is full."""

    @property
    def no_space(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class CorruptEnvelope(ValueError):
    """An envelope file could not be parsed: it belongs in corrupt/."""


@dataclass
class Recipient:
    """One envelope recipient and where its delivery stands."""

    address: str
    state: str = PENDING
    reply: str | None = None  # last upstream reply for this recipient
    status: str | None = None  # enhanced status code of that reply
    backend: str | None = None
    remote_mta: str | None = None  # host name of that backend, for DSNs
    notify: str | None = None  # RFC 3461 NOTIFY, as given
    orcpt: str | None = None  # RFC 3461 ORCPT, as given
    reported: bool = False  # its failure went into a DSN (or a double-bounce alert)
    updated: float | None = None

    @property
    def unfinished(self) -> bool:
        return self.state in UNFINISHED


@dataclass
class Envelope:
    """Everything about a message except its content; rewritten on each change."""

    id: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    size: int = 0
    client: str | None = None
    helo: str | None = None
    auth_user: str | None = None  # the client's SMTP AUTH login
    message_id: str | None = None
    source: str = "smtp"
    smtputf8: bool = False  # the client asked for SMTPUTF8
    crlf: bool = False  # every line of the content was made to end with CRLF on the way in
    body: str | None = None  # MAIL BODY= (7BIT or 8BITMIME)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    ret: str | None = None  # RFC 3461 RET
    envid: str | None = None  # RFC 3461 ENVID
    warned: bool = False  # a "delayed" DSN went out
    waiting_groups: list[str] = field(default_factory=list)  # every backend was down
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = ENVELOPE_VERSION

    def unfinished(self) -> list[Recipient]:
        return [r for r in self.recipients if r.unfinished]

    def to_bytes(self) -> bytes:
        # vars(), not dataclasses.asdict: no deep copy for a record that is only read.
        record = {**vars(self), "recipients": [vars(r) for r in self.recipients]}
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse an envelope file, or the envelope that starts a commit's file."""
        if data.startswith(EMBEDDED):
            data = split_commit_file(data)[0]
        try:
            raw = json.loads(data)
            recipients = [Recipient(**r) for r in raw.pop("recipients")]
            env = cls(recipients=recipients, **raw)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise CorruptEnvelope(str(exc)) from exc
        if not env.recipients or not isinstance(env.id, str):
            raise CorruptEnvelope("envelope has no recipients")
        return env


# Crockford's base32 sorts in time order as text, and avoids look-alike letters.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_id() -> str:
    """A unique queue ID that sorts by arrival: 11 chars of µs time, 5 random."""
    return _base32(time.time_ns() // 1000, 11) + _base32(secrets.randbits(25), 5)


def id_time(queue_id: str) -> float:
    """The time (epoch seconds) at which `new_id` made `queue_id`: its arrival."""
    micros = 0
    for char in queue_id[:11]:
        micros = micros * 32 + _ALPHABET.index(char)
    return micros / 1e6


_QUEUE_ID = re.compile(f"[{_ALPHABET}]{{16}}\\Z")


def is_queue_id(name: str) -> bool:
    return _QUEUE_ID.match(name) is not None


def fsync_dir(path: str) -> None:
    """Make the names in a directory durable (after a rename into or out of it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SyncChoice:
    """For each batch, the cheaper of two ways of making it durable; both are durable.

    A syncfs(2) flushes the whole file system, each step's in one call (two a batch): on
    a quiet disk one journal commit for any number of files, but beside a busy writer
    it waits for that writer's dirty pages too. An fsync(2) per file and directory
    (files + 2 a batch) waits for that file's data only. So the choice keeps a running
    cost of one call of each way, learnt from the calls timed where they are made (a
    call that fails is not counted), and takes the way whose batch is expected to cost
    less, less TRIAL_SHARE of the time since that way was last timed: the way left
    aside is tried again now and then, so neither cost goes stale. The clock can be
    injected: the choice is arithmetic on the timings it is given. Threads may time
    calls at once: a timing lost in a race only leaves the estimate a little older.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._costs: dict[str, tuple[float, float]] = {}  # way: (seconds a call, learnt at)
        self._timed = {SYNCFS: [0.0, 0], FSYNC: [0.0, 0]}  # seconds, calls since then

    def syncfs_cheaper(self, files: int) -> bool:
        """Whether one syncfs a step is the way for a batch of `files`."""
        now = self._clock()
        self._learn(now)
        # A syncfs for the data, one for the names; or an fsync of each file, then of
        # msg/ and of queue/. Never timed, a way is tried: syncfs first, then fsyncs.
        return self._worth(SYNCFS, 2, now) <= self._worth(FSYNC, files + 2, now)

    @contextlib.contextmanager
    def timing(self, way: str) -> Iterator[None]:
        """Time the one call of `way` in the block, if it succeeds."""
        started = self._clock()
        yield
        self.timed(way, self._clock() - started)

    def timed(self, way: str, seconds: float) -> None:
        """One call of `way` took `seconds`."""
        timed = self._timed[way]
        timed[0] += seconds
        timed[1] += 1

    def _learn(self, now: float) -> None:
        # The calls of a batch make one timing, their mean: in a batch of fsyncs the
        # directories' (journal commits) cost more than the files', and come last.
        for way, (seconds, calls) in self._timed.items():
            if calls:
                timing = seconds / calls
                cost, learnt_at = self._costs.get(way, (timing, now))
                if now - learnt_at > COST_KEPT:
                    cost = timing
                self._costs[way] = (cost + COST_WEIGHT * (timing - cost), now)
                self._timed[way] = [0.0, 0]

    def _worth(self, way: str, calls: int, now: float) -> float:
        if way not in self._costs:
            return -math.inf
        cost, learnt_at = self._costs[way]
        return calls * cost - TRIAL_SHARE * (now - learnt_at)


class SpoolObserver(Protocol):
    """What wants to know where each envelope goes (see `Spool.observer`)."""

    def moved(self, queue_id: str, src: str | None, dst: str | None) -> None: ...


class Spool:
    """State directories under one root, and the only code that writes them."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._lock_fd: int | None = None
        self._syncfs = libc.syncfs_call()
        self.sync_choice = SyncChoice()
        # Told of every change of an envelope's state made through this Spool:
        # moved(queue_id, from, to), None for "new" and "gone" (metrics.QueueShape).
        self.observer: SpoolObserver | None = None

    # -- paths -------------------------------------------------------------

    def dir(self, state: str) -> str:
        return os.path.join(self.root, state)

    def path(self, state: str, queue_id: str) -> str:
        return os.path.join(self.root, state, queue_id)

    def message_path(self, queue_id: str) -> str:
        return self.path(MSG, queue_id)

    # -- set-up --------------------------------------------------------------

    def create(self) -> None:
        """Make the state directories, private to the service user, and the drop area."""
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for name in (*DIRECTORIES, DROP):
                os.makedirs(self.dir(name), mode=0o700, exist_ok=True)
            os.chmod(self.root, ROOT_MODE)
            for name in DIRECTORIES:
                os.chmod(self.dir(name), 0o700)
            os.chmod(self.dir(DROP), DROP_MODE)
        except OSError as exc:  # a read-only file system, a file in the way...
            raise SpoolError(
                exc.errno, f"spool {self.root}: cannot set up {exc.filename}: {exc.strerror}"
            ) from exc

    def lock(self, wait: float | None = None) -> None:
        """Take the spool for this process; a second relay on it would double-send.

        A relay that was just killed may leave its delivery process a moment to notice
        and exit (it shares the lock): `wait` seconds are given for that.
        """

        fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise SpoolError(
                    errno.EBUSY, f"spool {self.root} is in use by pid {holder}"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the lock, for a process that works on this spool too."""
        return self._lock_fd

    def adopt_lock(self, fd: int) -> None:
        """Hold a lock taken by the parent process (see `lock_fd`)."""
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def watch_lock(self) -> int:
        """The lock file opened to look at (`lock_holder`), never to take."""
        path = os.path.join(self.root, LOCK_NAME)
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    @staticmethod
    def lock_holder(lock_fd: int) -> int | None:
        """The pid in the lock file while a relay holds the lock; None when nobody does
        (a pid left in the file by a relay that is gone is never signalled)."""
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            return None
        # A relay writes its pid just after taking the lock: give it a moment.
        for _ in range(50):
            text = os.pread(lock_fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit() and int(text) > 1:
                return int(text)
            time.sleep(0.02)
        return None

    def request_drain(self, timeout: float, owner: os.stat_result) -> None:
        """Leave `timeout` (seconds) for the running relay: mode 0600, owned as `owner`
        (the lock file: the relay's user)."""
        path = os.path.join(self.root, DRAIN_NAME)
        _unlink_quietly(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, owner.st_uid, owner.st_gid)
            os.write(fd, f"{timeout:g}\n".encode())
        finally:
            os.close(fd)

    def take_drain_request(self) -> float | None:
        """The timeout `request_drain` left, if it is fresh; the request is removed."""
        path = os.path.join(self.root, DRAIN_NAME)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            fresh = time.time() - os.fstat(fd).st_mtime < DRAIN_REQUEST_MAX_AGE
            text = os.read(fd, 64).decode("ascii", "replace").strip()
        except OSError:  # not a file (a directory planted there): no timeout in it
            return None
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        try:
            return max(0.0, float(text)) if fresh else None
        except ValueError:
            return None

    @contextlib.contextmanager
    def command_claims(self) -> Iterator[None]:
        """Held (shared) by a queue command while it may claim mail into active/.

        The kernel drops the lock when the command exits or is killed, so while
        nobody holds it, every envelope in active/ that the delivery process does not
        hold is a dead process's claim (see `no_command_claims`).
        """

        try:
            fd = self._open_commands_lock()
        except OSError:
            yield  # a spool we cannot write to: this command claims nothing either
            return
        try:
            self._give_to_owner(fd)  # root made it: the relay must open it too
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def no_command_claims(self) -> Iterator[bool]:
        """True (and no queue command may claim meanwhile) when no command holds
        `command_claims`; False when one does or the lock cannot be had."""

        try:
            fd = self._open_commands_lock()
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def _open_commands_lock(self) -> int:
        # Read-only is enough for flock, and lets the relay use a file root made.
        path = os.path.join(self.root, _COMMANDS_LOCK_NAME)
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)

    # -- atomic writes -------------------------------------------------------

    def _write_tmp(
        self, queue_id: str, kind: str, chunks: list[bytes], mtime: float | None, sync: bool = True
    ) -> str:
        """Write a complete file in tmp/ (fsynced unless the caller syncs) and return its
        path."""
        path = os.path.join(self.dir(TMP), f"{queue_id}.{os.getpid()}.{kind}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._give_to_owner(fd)
            with os.fdopen(fd, "wb", closefd=False) as out:
                for chunk in chunks:
                    out.write(chunk)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            if sync:
                with self.sync_choice.timing(FSYNC):
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        return path

    def _give_to_owner(self, fd: int) -> None:
        """Files root writes (a queue command) belong to the spool's owner, the service
        user, which must be able to read them."""
        if os.geteuid() != 0:
            return
        owner = os.stat(self.root)
        if owner.st_uid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)

    def commit(self, env: Envelope, content: list[bytes]) -> None:
        """Make a new message durable in queue/; only then may it be acknowledged."""
        error = self.commit_many([(env, content)])[0]
        if error is not None:
            raise error
        if self.observer is not None:
            self.observer.moved(env.id, None, QUEUE)

    def committed_elsewhere(self, queue_id: str) -> None:
        """Another process (the receiving half) committed `queue_id` to queue/."""
        if self.observer is not None:
            self.observer.moved(queue_id, None, QUEUE)

    def draft(self, queue_id: str) -> Draft:
        """A new message's content, to be written as it arrives and then committed."""
        return Draft(self, queue_id)

    def commit_many(self, messages: list[tuple[Envelope, Content]]) -> list[SpoolError | None]:
        """Commit several messages together (group commit).

        Each message's file is written into tmp/; their data is made durable; each is
        renamed into msg/ and linked into queue/; then those names are made durable.
        Where Linux has syncfs(2), each "made durable" may be one syncfs for the whole
        batch, one journal commit and one disk flush, instead of an fsync per file and
        per directory: whichever `sync_choice` expects to cost less. Returns, in order,
        None for each message now durable, or the error that kept it out of the queue:
        one message's failure fails no other.

        Content is a list of chunks, or a Draft: one still in memory is written like
        chunks; one already written into tmp/ (large mail) keeps that file as its
        content, and its envelope gets a file of its own (the two-file layout).
        """
        results: list[SpoolError | None] = [None] * len(messages)
        syncfs = self._syncfs_for(len(messages))
        with self._queue_fd(syncfs) as queue_fd:
            written: dict[int, str] = {}
            for i, (env, content) in enumerate(messages):
                try:
                    written[i] = self._write_commit_file(env, content, sync=queue_fd is None)
                except OSError as exc:
                    results[i] = _commit_error(env, exc)
                    if isinstance(content, Draft):
                        content.discard()
            if written and queue_fd is not None:
                try:
                    self._timed_syncfs(queue_fd)
                except OSError as exc:
                    for i, path in written.items():
                        _unlink_quietly(path)
                        results[i] = _commit_error(messages[i][0], exc)
                    written = {}
            queued = []
            for i, path in written.items():
                try:
                    env, content = messages[i]
                    if isinstance(content, Draft) and content.path == path:  # its own file
                        self._give_draft_names(env, path)
                    else:
                        self._give_names(env, path)
                    queued.append(i)
                except OSError as exc:
                    results[i] = _commit_error(messages[i][0], exc)
            if queued:
                try:
                    if queue_fd is not None:
                        self._timed_syncfs(queue_fd)
                    else:
                        for state in (MSG, QUEUE):
                            with self.sync_choice.timing(FSYNC):
                                fsync_dir(self.dir(state))
                except OSError as exc:
                    for i in queued:
                        self._take_back(messages[i][0].id)
                        results[i] = _commit_error(messages[i][0], exc)
        return results

    def _write_commit_file(self, env: Envelope, content: Content, sync: bool) -> str:
        """The file a commit renames into msg/: envelope and content in one file, or a
        Draft's own file (its envelope is then written beside it, in `_give_draft_names`)."""
        mtime = env.next_attempt or None
        if isinstance(content, Draft):
            if content.error is not None:
                raise content.error
            if content.path is not None:
                return content.finish()
            content = content.chunks
        first = [EMBEDDED, env.to_bytes(), b"\n", *content]
        return self._write_tmp(env.id, "msg", first, mtime, sync=sync)

    def _give_draft_names(self, env: Envelope, path: str) -> None:
        """A Draft's file becomes msg/ID; its envelope, written now, becomes queue/ID
        (the commit point)."""
        written = [path]
        try:
            os.rename(path, self.message_path(env.id))
            written[0] = self.message_path(env.id)
            self._stage_envelope_apart(env, written)
        except OSError:
            for name in written:
                _unlink_quietly(name)
            raise

    def _syncfs_for(self, files: int) -> Callable[[int], None] | None:
        """syncfs for a batch of `files`, unless it is missing or per-file fsyncs are
        expected to cost less (it flushes everything on the file system: while another
        program writes much, per-file fsyncs wait for less)."""
        if self._syncfs is None or not self.sync_choice.syncfs_cheaper(files):
            return None
        return self._syncfs

    @contextlib.contextmanager
    def _queue_fd(self, wanted: object) -> Iterator[int | None]:
        # Opened before the batch's writes: syncfs reports the write errors seen since.
        # queue/, not the root: tmp/, msg/ and queue/ are one file system (renames and
        # links between them work), the root may be another.
        try:
            fd = os.open(self.dir(QUEUE), os.O_RDONLY | os.O_DIRECTORY) if wanted else None
        except OSError:
            fd = None  # per-file fsyncs then, which meet the problem where it is
        if fd is None:
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _timed_syncfs(self, fd: int) -> None:
        assert self._syncfs is not None
        with self.sync_choice.timing(SYNCFS):
            self._syncfs(fd)

    def _give_names(self, env: Envelope, path: str) -> None:
        """Rename a written message into msg/ and link it into queue/ (the commit point)."""
        written = [path]
        try:
            os.rename(path, self.message_path(env.id))
            written[0] = self.message_path(env.id)
            try:
                os.link(written[0], self.path(QUEUE, env.id))
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                self._stage_envelope_apart(env, written)
        except OSError:
            for name in written:
                _unlink_quietly(name)
            raise

    def _take_back(self, queue_id: str) -> None:
        """Undo a commit whose names could not be made durable (see `_uncommit`)."""
        if self._uncommit(queue_id):
            _unlink_quietly(self.path(TMP, f"{queue_id}.{os.getpid()}.env"))
            _unlink_quietly(self.message_path(queue_id))

    def _stage_envelope_apart(self, env: Envelope, written: list[str]) -> None:
        """Without hard links: the envelope gets a file of its own, at one more fsync."""
        written.append(self._write_tmp(env.id, "env", [env.to_bytes()], env.next_attempt or None))
        os.rename(written[1], self.path(QUEUE, env.id))

    def _uncommit(self, queue_id: str) -> bool:
        """Take back a queued envelope whose commit could not be made durable.

        False if a worker already claimed it: it is being delivered, so its content
        must stay; the client, told 4xx, may send it again (at-least-once).
        """
        try:
            os.rename(
                self.path(QUEUE, queue_id),
                os.path.join(self.dir(TMP), f"{queue_id}.{os.getpid()}.env"),
            )
        except OSError:
            return False
        return True

    def rewrite(self, env: Envelope, state: str) -> None:
        """Replace the envelope in `state` with `env`, atomically and durably."""
        tmp = self._write_tmp(env.id, "env", [env.to_bytes()], env.next_attempt or None)
        try:
            os.rename(tmp, self.path(state, env.id))
        except OSError:
            _unlink_quietly(tmp)
            raise
        fsync_dir(self.dir(state))

    def announce(self, queue_id: str) -> None:
        """Tell a running relay that a message appeared in queue/ (for writers outside
        it: queue commands). Its watcher sees attribute changes, not renames, so that
        the relay's own renames cost it nothing; the times are set to what they were."""
        path = self.path(QUEUE, queue_id)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):  # never the target of a link planted there
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        except FileNotFoundError:
            pass  # already taken by the relay: it knows

    def move(self, queue_id: str, src: str, dst: str, *, durable: bool = True) -> bool:
        """Rename an envelope from one state to another; False if it was not in `src`."""
        try:
            os.rename(self.path(src, queue_id), self.path(dst, queue_id))
        except FileNotFoundError:
            return False
        if self.observer is not None:
            self.observer.moved(queue_id, src, dst)
        if durable:
            fsync_dir(self.dir(dst))
            fsync_dir(self.dir(src))
        return True

    # -- reading -------------------------------------------------------------

    def read_envelope(self, state: str, queue_id: str) -> Envelope:
        return self._parse_envelope(self.envelope_bytes(state, queue_id), queue_id)

    @staticmethod
    def _parse_envelope(data: bytes, queue_id: str) -> Envelope:
        env = Envelope.from_bytes(data)
        if env.id != queue_id:
            raise CorruptEnvelope(f"the envelope in {queue_id} names {env.id[:32]!r}")
        return env

    def envelope_bytes(self, state: str, queue_id: str) -> bytes:
        """The envelope's JSON, without the content a commit's file carries after it."""
        return self._read_state_file(state, queue_id)[0]

    def _read_state_file(self, state: str, queue_id: str) -> tuple[bytes, bytes | None]:
        """(the envelope's JSON, the content after it if the file was read whole).

        Read in blocks until the envelope's line ends: most mail is one block, so a
        claim has the content too without reading the file again.
        """
        fd = open_regular(self.path(state, queue_id), queue_id)
        try:
            data = os.read(fd, _ENVELOPE_READ)
            whole = len(data) < _ENVELOPE_READ  # a short read of a file is its end
            if not data.startswith(EMBEDDED):
                return (data if whole else data + _read_rest(fd)), None
            while not whole and b"\n" not in data:
                more = os.read(fd, _ENVELOPE_READ)
                whole = len(more) < _ENVELOPE_READ
                data += more
            envelope, content = split_commit_file(data)
        finally:
            os.close(fd)
        return envelope, (content if whole else None)

    def read_message(self, queue_id: str, size: int | None = None) -> bytes:
        """The content; with `size` (the envelope's), a shorter or longer file is corrupt."""
        data = _read_file(self.message_path(queue_id))
        if data.startswith(EMBEDDED):
            data = split_commit_file(data)[1]
        return _of_size(data, size)

    def open_message(self, queue_id: str, size: int | None = None) -> BinaryIO:
        """The content's file, positioned at its start, to be read in blocks: a large
        message is sent without ever being whole in memory. With `size` (the
        envelope's), a shorter or longer content is corrupt, as for `read_message`.
        """
        fd = self._open_content(queue_id)
        try:
            start = self._content_offset(fd, queue_id)
            length = os.fstat(fd).st_size - start
            if size and length != size:
                raise CorruptEnvelope(f"message content is {length} bytes, not {size}")
            os.lseek(fd, start, os.SEEK_SET)
            # Unbuffered: it is read in blocks bigger than a buffer would be.
            return os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise

    def read_message_head(self, queue_id: str, limit: int = 1 << 20) -> bytes:
        """The content's header section and the empty line that ends it, or its first
        `limit` bytes if that line does not come sooner: what a DSN returns of a large
        message, or `queue show` prints, without reading the rest."""
        head = bytearray()
        with self.open_message(queue_id) as file:
            while len(head) < limit:
                block = file.read(min(_ENVELOPE_READ, limit - len(head)))
                if not block:
                    break
                searched = max(0, len(head) - 2)  # the empty line may start in the last block
                head += block
                found = headers.empty_line(head, searched)
                if found is not None:
                    return bytes(head[: found[1]])
        return bytes(head[:limit])

    def _open_content(self, queue_id: str) -> int:
        return open_regular(self.message_path(queue_id), queue_id)

    @staticmethod
    def _content_offset(fd: int, queue_id: str) -> int:
        """Where the content starts: after the envelope's line in a commit's file, at 0
        in a file of content only. Read in blocks: the envelope never costs the file."""
        try:
            block = os.read(fd, _ENVELOPE_READ)
            if not block.startswith(EMBEDDED):
                return 0
            offset = 0
            while (end := block.find(b"\n")) < 0:
                if not block:
                    raise CorruptEnvelope("the envelope at the start of the file has no end")
                offset += len(block)
                block = os.read(fd, _ENVELOPE_READ)
            return offset + end + 1
        except IsADirectoryError:
            raise CorruptEnvelope(f"{queue_id} is a directory") from None

    def scan(self, state: str = QUEUE) -> Iterator[tuple[str, float]]:
        """Yield (queue_id, due time) for each envelope in `state`, from stat() only."""
        for queue_id in self.each_name(state):
            due = self.due(state, queue_id)
            if due is not None:  # else claimed or moved while we looked
                yield queue_id, due

    def each_name(self, state: str) -> Iterator[str]:
        """The queue IDs in `state` one by one, from the directory alone (no stat:
        cheap when the queue is long)."""
        try:
            entries = os.scandir(self.dir(state))
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                if is_queue_id(entry.name):
                    yield entry.name

    def nothing_due(self, now: float | None = None) -> bool:
        """Nothing being delivered (active/), nothing due in queue/ (its mtime is its due
        time), nothing waiting in drop/ (files being written, `.tmp-`, aside); from the
        directories and stat() alone."""
        now = time.time() if now is None else now
        for _ in self.each_name(ACTIVE):
            return False
        for _, due in self.scan(QUEUE):
            if due <= now:
                return False
        try:
            with os.scandir(self.dir(DROP)) as entries:
                if any(not entry.name.startswith(".") for entry in entries):
                    return False
        except FileNotFoundError:
            pass
        return True

    def entry_stat(self, state: str, queue_id: str) -> os.stat_result:
        """An entry's own stat, never that of what a link planted there points to
        (nor ELOOP for a link to itself): the claim sets such garbage aside."""
        return os.stat(self.path(state, queue_id), follow_symlinks=False)

    def due(self, state: str, queue_id: str) -> float | None:
        """When `queue_id` in `state` is next due (its file's mtime); None if gone."""
        try:
            return self.entry_stat(state, queue_id).st_mtime
        except FileNotFoundError:
            return None

    def set_due(self, state: str, queue_id: str, due: float) -> bool:
        """Make `queue_id` in `state` due at `due`; False if it is not there. A running
        relay's watcher sees the change (in queue/) at once."""
        try:
            os.utime(self.path(state, queue_id), (due, due), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def moved_in_at(self, state: str, queue_id: str) -> float | None:
        """When `queue_id` came into `state` (the rename set its ctime); None if gone."""
        try:
            return self.entry_stat(state, queue_id).st_ctime
        except FileNotFoundError:
            return None

    def locate(self, queue_id: str) -> str | None:
        """The state directory that holds `queue_id`'s envelope, if any."""
        for state in ENVELOPE_STATES:
            if os.path.lexists(self.path(state, queue_id)):
                return state
        return None

    # -- delivery lifecycle --------------------------------------------------

    def claim_message(self, queue_id: str) -> tuple[Envelope, bytes | None] | None:
        """Move a waiting message to active/ for one worker: its envelope, and its
        content when the envelope's file carried it whole (else None: `read_message`
        reads it); None if it is gone."""
        if not self.move(queue_id, QUEUE, ACTIVE, durable=False):
            return None
        try:
            data, content = self._read_state_file(ACTIVE, queue_id)
            env = self._parse_envelope(data, queue_id)
            return env, None if content is None else _of_size(content, env.size)
        except CorruptEnvelope as exc:
            self.quarantine(queue_id, ACTIVE, str(exc))
        except FileNotFoundError:
            pass
        return None

    def requeue(self, env: Envelope) -> None:
        """Store the updated envelope and put it back to wait for `env.next_attempt`."""
        # Rewrite in place first, then one rename: never two copies in two states.
        self.rewrite(env, ACTIVE)
        self.move(env.id, ACTIVE, QUEUE)

    def finish(self, env: Envelope) -> None:
        """Every recipient has its outcome: remove the message."""
        self.discard(env.id, ACTIVE)

    def discard(self, queue_id: str, state: str) -> None:
        """Remove a message whose envelope this process holds (envelope first: the
        commit point; a crash in between leaves content that recovery sets aside)."""
        os.unlink(self.path(state, queue_id))
        if self.observer is not None:
            self.observer.moved(queue_id, state, None)
        _unlink_quietly(self.message_path(queue_id))

    def park_failed(self, env: Envelope) -> None:
        """Keep a message nobody can be told about in failed/, for a human."""
        self.rewrite(env, ACTIVE)
        self.move(env.id, ACTIVE, FAILED)

    # -- recovery and quarantine ---------------------------------------------

    def quarantine(self, queue_id: str, state: str, reason: str) -> None:
        """Move an unreadable envelope and its content to corrupt/; never delete."""
        moved = []
        sources = [(MSG, "message")]
        if state != MSG:
            sources.insert(0, (state, "envelope"))
        for source_state, suffix in sources:
            if os.path.lexists(self.path(source_state, queue_id)):
                dst = self.set_aside(source_state, queue_id, f"{queue_id}.{suffix}")
                moved.append(os.path.basename(dst))
        if self.observer is not None:
            self.observer.moved(queue_id, state, None)
        log.event(
            "quarantined",
            level=logging.WARNING,
            queue_id=queue_id,
            state=state,
            reason=reason,
            files=moved,
        )

    def set_aside(self, state: str, name: str, new_name: str) -> str:
        """Move the entry `name` of `state` (whatever it is: a link or FIFO is renamed
        itself, never its target) into corrupt/ as `new_name`; its path there."""
        dst = self._corrupt_name(new_name)
        os.rename(self.path(state, name), dst)
        return dst

    def _corrupt_name(self, name: str) -> str:
        """A path in corrupt/ that no earlier file has: quarantine never overwrites."""
        candidate = os.path.join(self.dir(CORRUPT), name)
        n = 1
        while os.path.lexists(candidate):
            candidate = os.path.join(self.dir(CORRUPT), f"{name}.{n}")
            n += 1
        return candidate

    def recover(self) -> dict[str, int]:
        """At start: clear dead writes, hand claimed mail back, quarantine orphans."""
        counts = {"tmp_removed": 0, "requeued": 0, "orphans": 0}
        counts["tmp_removed"] = self._clear_dead_tmp()
        for queue_id in set(self.each_name(ACTIVE)):
            if self.move(queue_id, ACTIVE, QUEUE, durable=False):
                counts["requeued"] += 1
        counts["orphans"] = self._quarantine_orphans()
        fsync_dir(self.dir(QUEUE))
        fsync_dir(self.dir(ACTIVE))
        return counts

    def _clear_dead_tmp(self) -> int:
        """Remove tmp files of processes that died: they were never acknowledged."""
        removed = 0
        with os.scandir(self.dir(TMP)) as entries:
            for entry in entries:
                parts = entry.name.split(".")
                pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
                if pid is not None and pid != os.getpid() and _pid_alive(pid):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    # Not a write of ours: set aside, never deleted (nor allowed to stop us).
                    dst = self.set_aside(TMP, entry.name, entry.name)
                    log.event(
                        "quarantined",
                        level=logging.WARNING,
                        state=TMP,
                        reason="a directory in tmp/",
                        files=[os.path.basename(dst)],
                    )
                    continue
                _unlink_quietly(entry.path)
                removed += 1
        return removed

    def _quarantine_orphans(self) -> int:
        """An envelope without content, or content without an envelope, goes aside."""
        # Names only, no stat: this runs before the relay listens, and a long queue
        # must not keep clients waiting. One set of names is held, not one per state.
        contents = set(self.each_name(MSG))
        unmatched = set(contents)
        without_content: list[tuple[str, str]] = []
        for state in ENVELOPE_STATES:
            for queue_id in self.each_name(state):
                if queue_id in contents:
                    unmatched.discard(queue_id)
                else:
                    without_content.append((queue_id, state))
        for queue_id, envelope_state in without_content:
            self.quarantine(queue_id, envelope_state, "envelope without message content")
        for queue_id in unmatched:
            self.quarantine(queue_id, MSG, "message content without an envelope")
        return len(without_content) + len(unmatched)


class Draft:
    """A new message's content as it arrives: held in memory while small, then written
    into tmp/ as it comes (large mail never sits whole in memory); committed by
    `Spool.commit_many`, or discarded. Its file is fsynced when finished, whatever
    the batch does: a syncfs reports only the write errors seen since its descriptor
    was opened, at the commit, and this file was written before."""

    def __init__(self, spool: Spool, queue_id: str, in_memory: int = IN_MEMORY) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self._in_memory = in_memory
        self.chunks: list[bytes] = []
        self.size = 0
        self.path: str | None = None  # the file in tmp/, once the content is written there
        self.error: OSError | None = None  # a write failed: the commit will refuse it
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        self.size += len(data)
        if self._fd is None:
            self.chunks.append(data)
            if self.size <= self._in_memory:
                return
            data, self.chunks = b"".join(self.chunks), []
            try:
                self._open()
            except OSError as exc:
                self._fail(exc)
                return
        try:
            _write_all(self._fd, data)  # type: ignore[arg-type]
        except OSError as exc:
            self._fail(exc)

    def _open(self) -> None:
        path = os.path.join(self._spool.dir(TMP), f"{self.queue_id}.{os.getpid()}.draft")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.path = path
        self._spool._give_to_owner(self._fd)

    def _fail(self, exc: OSError) -> None:
        self.discard()
        self.error = exc

    def finish(self) -> str:
        """Fsync and close the written file; its path. (Not timed for the batch's
        choice: it is no choice, and a large file would skew the per-file estimate.)"""
        assert self._fd is not None and self.path is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)  # its descriptor has seen every write-back error since the first write
        finally:
            os.close(fd)
        return self.path

    def discard(self) -> None:
        """Nothing of it stays (an aborted DATA, a refused message); idempotent."""
        self.chunks = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            _unlink_quietly(self.path)
            self.path = None


# What a commit takes as a message's content.
Content = Union[list[bytes], Draft]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def split_commit_file(data: bytes) -> tuple[bytes, bytes]:
    """(envelope JSON, content) of a file a commit wrote (it starts with EMBEDDED)."""
    end = data.find(b"\n")
    if end < 0:
        raise CorruptEnvelope("the envelope at the start of the file has no end")
    return data[len(EMBEDDED) : end], data[end + 1 :]


def _commit_error(env: Envelope, exc: OSError) -> SpoolError:
    return SpoolError(exc.errno, f"cannot commit {env.id}: {exc.strerror or exc}")


def _of_size(content: bytes, size: int | None) -> bytes:
    """The content, if it has the envelope's `size`: a shorter or longer one is corrupt."""
    if size and len(content) != size:
        raise CorruptEnvelope(f"message content is {len(content)} bytes, not {size}")
    return content


def _read_rest(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_file(path: str) -> bytes:
    """A spool file's bytes; anything but a regular file there is corrupt."""
    with os.fdopen(open_regular(path, os.path.basename(path)), "rb") as f:
        return f.read()


def open_regular(path: str, name: str) -> int:
    """A descriptor for reading the regular file at `path`; a link, a directory, a
    FIFO or a device there (garbage, or planted) is CorruptEnvelope, never followed
    and never waited on (O_NONBLOCK: opening a FIFO would block for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptEnvelope(f"{name} is a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise CorruptEnvelope(f"{name} is a directory") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise CorruptEnvelope(f"{name} is {kind}")
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
