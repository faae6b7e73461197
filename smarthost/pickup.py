"""Pickup: moves local submissions from the drop area into the queue.

Files in drop/ come from any local user: untrusted input. Each is opened without
following links and without blocking (a FIFO does not hang us), must be a regular
file of sane size with a valid record, and then goes through the same path as mail
from SMTP (rewriting, headers, durable commit) before it is removed. Anything else is
moved to corrupt/ with a log line; a bad file never stops the others.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import re
import stat
import threading
import time
from collections.abc import Callable

from . import headers, log
from .config import Config
from .sendmail import DROP_MAGIC, UsageError, check_address
from .spool import DROP, Envelope, Recipient, Spool, SpoolError, new_id
from .submission import MailLoop, prepare

_DROP_NAME = re.compile(r"^[0-9a-f]{32}\.drop$")
STALE_TMP = 3600.0  # a sendmail that never finished its write: it never exited 0
RESCAN_INTERVAL = 10.0
POISON_LIMIT = 5  # a file that fails this often for no reason of its own is set aside
HEADER_ROOM = 64 * 1024  # the headers sendmail adds after checking the size


class BadDrop(ValueError):
    """The file is not a valid submission: it goes to corrupt/."""


class Pickup:
    """A thread that drains drop/ whenever woken, and on a timer."""

    def __init__(self, config: Config, spool: Spool, submit: Callable[[Envelope], None]) -> None:
        self.config = config
        self.spool = spool
        self.submit = submit
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The message, plus a record that may list many recipients.
        self.limit = 2 * config.smtp.max_message_size + 1024 * 1024
        self._failures: dict[str, int] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pickup", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.scan()
            except OSError as exc:
                log.event("spool_error", level=logging.ERROR, error=f"drop area: {exc}")
            self._wake.wait(RESCAN_INTERVAL)

    def scan(self) -> int:
        """Take in every complete file in drop/; the number taken."""
        taken = 0
        with os.scandir(self.spool.dir(DROP)) as entries:
            names = [e.name for e in entries]
        for name in names:
            if self._stopping.is_set():
                break
            if name.startswith(".tmp-"):
                self._remove_if_stale(name)
            elif self.take(name):
                taken += 1
        return taken

    def take(self, name: str) -> bool:
        """Validate one drop file and queue it; quarantine it if it is bad."""
        path = os.path.join(self.spool.dir(DROP), name)
        try:
            data, owner = self._read(path, name)
            env, content = self._parse(data, owner)
            env.to_bytes()  # an envelope that cannot be stored is bad input, found now
        except FileNotFoundError:
            return False
        except BadDrop as exc:
            self._quarantine(name, str(exc))
            return False
        except Exception as exc:
            # Not the file's fault as far as we know (EMFILE, EIO, a bug): it was
            # acknowledged to its sender, so it stays, and is set aside only if it
            # keeps failing.
            return self._failed_again(name, exc)
        try:
            self.spool.commit(env, content)
        except SpoolError as exc:
            log.event("spool_error", level=logging.ERROR, queue_id=env.id, error=str(exc))
            return False  # stays in drop/ for the next scan
        log.event(
            "received",
            queue_id=env.id,
            client="local",
            user=owner,
            sender=env.sender,
            recipients=[r.address for r in env.recipients],
            size=env.size,
            message_id=env.message_id,
        )
        os.unlink(path)
        self.submit(env)
        return True

    def _failed_again(self, name: str, error: Exception) -> bool:
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        log.event("spool_error", level=logging.ERROR, file=f"drop/{name[:64]}", error=repr(error))
        if count >= POISON_LIMIT:
            del self._failures[name]
            self._quarantine(name, f"failed {count} times: {error!r}")
        return False

    def _read(self, path: str, name: str) -> tuple[bytes, str]:
        if not _DROP_NAME.match(name):
            raise BadDrop("not a drop file name")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM):
                raise BadDrop(f"cannot open: {exc.strerror}") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadDrop("not a regular file")
            if info.st_nlink != 1:
                raise BadDrop("a file with other names (hard links)")
            if info.st_size > self.limit:
                raise BadDrop(f"larger than {self.limit} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(self.limit + 1)
        finally:
            os.close(fd)
        return data, _user_name(info.st_uid)

    def _parse(self, data: bytes, owner: str) -> tuple[Envelope, list[bytes]]:
        if not data.startswith(DROP_MAGIC):
            raise BadDrop("no drop record")
        line_end = data.find(b"\n", len(DROP_MAGIC))
        if line_end < 0:
            raise BadDrop("truncated drop record")
        try:
            record = json.loads(data[len(DROP_MAGIC) : line_end])
            sender, recipients = record["sender"], record["recipients"]
            if not isinstance(sender, str) or not isinstance(recipients, list):
                raise TypeError("sender must be a string and recipients a list")
            for address in [*recipients, sender or "x"]:
                check_address(address)
        except (ValueError, KeyError, TypeError, RecursionError, UsageError) as exc:
            raise BadDrop(f"bad drop record: {exc}") from None
        if not recipients:
            raise BadDrop("no recipients")
        if len(data) - line_end > self.config.smtp.max_message_size + HEADER_ROOM:
            raise BadDrop("message larger than smtp.max_message_size")
        queue_id = new_id()
        submitted = Envelope(
            id=queue_id,
            sender=sender,
            recipients=[Recipient(address=a) for a in recipients],
            arrival=time.time(),
            client="local",
            helo=owner,
            source="local",
            smtputf8=not all(a.isascii() for a in [sender, *recipients]),
        )
        received = (
            f"Received: by {self.config.hostname} (smarthost, from userid {owner})\r\n"
            f"\tid {queue_id}; {headers.date_now()}\r\n"
        ).encode()
        try:
            return prepare(self.config, submitted, received, data[line_end + 1 :])
        except MailLoop as exc:
            raise BadDrop(str(exc)) from None

    def _quarantine(self, name: str, reason: str) -> None:
        source = os.path.join(self.spool.dir(DROP), name)
        target = self.spool.corrupt_name(f"drop-{int(time.time())}-{name[:64]}")
        try:
            os.rename(source, target)  # renames a link or FIFO itself, never its target
        except OSError as exc:
            reason += f" (could not move it aside: {exc.strerror})"
        log.event("quarantined", level=logging.WARNING, file=f"drop/{name[:64]}", reason=reason)

    def _remove_if_stale(self, name: str) -> None:
        path = os.path.join(self.spool.dir(DROP), name)
        try:
            if time.time() - os.lstat(path).st_mtime > STALE_TMP:
                os.unlink(path)
        except FileNotFoundError:
            pass


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
