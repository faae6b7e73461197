"""Pickup: moves local submissions from the drop area into the queue.

Files in drop/ come from any local user: untrusted input, read by `drop.read` (no link
followed, no FIFO waited on, bounded in size). Each file is one of:

* not a submission at all (`drop.NotADrop`: a link, a FIFO, garbage, a broken record):
  moved to corrupt/ with a `quarantined` event; a bad file never stops the others;
* a submission the relay refuses (`drop.admit` raises `submission.Refused`: an invalid
  address, too big, a mail loop, whatever `submission.prepare` refuses). sendmail made
  the same checks before it exited 0, so the config changed since or the file was
  crafted. It is bounced, as Postfix's cleanup bounces what it refuses from its pickup:
  a DSN to its sender (else to the user who dropped it) is committed to the queue
  before the file is removed, with a `rejected` event. Never set aside in silence;
* a submission: committed to the queue like mail from SMTP (rewriting, headers, the
  same durable commit), then removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable

from . import drop, dsn, log
from .bounce import SOURCE_DSN, build_notice
from .config import Config
from .spool import DROP, FAILED_RCPT, Envelope, Recipient, Spool, SpoolError, new_id
from .submission import Refused, scan_headers

STALE_TMP = 3600.0  # a sendmail that never finished its write: it never exited 0
POISON_LIMIT = 5  # a file that fails this often for no reason of its own is set aside
MAX_LISTED = 1000  # recipients named in the DSN for a refused submission
_STATUS = re.compile(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


class Pickup:
    """A thread that drains drop/ whenever woken, and on a timer."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        submit: Callable[[Envelope], None],
        rescan: float = 10.0,
    ) -> None:
        self.config = config
        self.spool = spool
        self.submit = submit
        self.rescan = rescan  # seconds between reads of drop/ when nothing wakes us
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: dict[str, int] = {}

    @property
    def limit(self) -> int:
        """Bytes of a drop file read whole: a larger one's message is too big anyway."""
        size = self.config.smtp.max_message_size + drop.HEADER_ROOM
        return len(drop.MAGIC) + drop.RECORD_MAX + 1 + size

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
        while True:
            self._wake.clear()
            # After the clear: a stop that set the flag and the wake just before it
            # must not leave this thread asleep until the next rescan.
            if self._stopping.is_set():
                return
            try:
                self.scan()
            except OSError as exc:
                log.event("spool_error", level=logging.ERROR, error=f"drop area: {exc}")
            self._wake.wait(self.rescan)

    def scan(self) -> int:
        """Take in every complete file in drop/; the number queued."""
        taken = 0
        with os.scandir(self.spool.dir(DROP)) as entries:
            names = [e.name for e in entries]
        for name in names:
            if self._stopping.is_set():
                break
            if drop.is_tmp_name(name):
                self._remove_if_stale(name)
            elif self.take(name):
                taken += 1
        return taken

    def take(self, name: str) -> bool:
        """Queue one drop file (True); bounce it if refused, quarantine it if bad."""
        try:
            sub, info = drop.read(self.spool.dir(DROP), name, self.limit)
        except FileNotFoundError:
            return False
        except drop.NotADrop as exc:
            self._quarantine(name, str(exc))
            return False
        except Exception as exc:
            # Not the file's fault as far as we know (EMFILE, EIO, a bug): it was
            # acknowledged to its sender, so it stays, and is set aside only if it
            # keeps failing.
            return self._failed_again(name, exc)
        owner = drop.user_name(info.st_uid)
        try:
            env, content = drop.admit(self.config, sub, owner)
        except Refused as exc:
            self._bounce(name, sub, owner, exc)
            return False
        except Exception as exc:
            return self._failed_again(name, exc)
        try:
            self.spool.commit(env, content)
        except SpoolError as exc:
            log.event("spool_error", level=logging.ERROR, queue_id=env.id, error=str(exc))
            return False  # stays in drop/ for the next scan
        log.event(
            "received",
            queue_id=env.id,
            source="sendmail",
            client="local",
            user=owner,
            sender=env.sender,
            recipients=[r.address for r in env.recipients],
            size=env.size,
            message_id=env.message_id,
        )
        self._remove(name)
        self.submit(env)
        return True

    def _bounce(self, name: str, sub: drop.Submission, owner: str, refusal: Refused) -> None:
        """Tell the submitter that the relay refuses its drop file: a DSN, committed
        before the file goes (a crash in between sends a second DSN, never none)."""
        try:
            refused, notice, content = self._refusal_dsn(sub, owner, refusal)
        except Exception as exc:
            self._failed_again(name, exc)
            return
        try:
            self.spool.commit(notice, [content])
        except SpoolError as exc:
            log.event("spool_error", level=logging.ERROR, queue_id=notice.id, error=str(exc))
            return  # stays in drop/ for the next scan
        listed = [r.address for r in refused.recipients]
        log.event(
            "rejected",
            level=logging.WARNING,
            queue_id=refused.id,
            source="sendmail",
            client="local",
            user=owner,
            file=f"drop/{name[:64]}",
            sender=_printable(sub.sender),
            recipients=listed,
            reply=refusal.reply,
            status=refused.recipients[0].status,
            reason=str(refusal),
        )
        log.event(
            "dsn_queued",
            queue_id=refused.id,
            dsn_queue_id=notice.id,
            action=dsn.FAILED,
            recipients=listed,
            sender=refused.sender,
        )
        self._remove(name)
        self.submit(notice)

    def _refusal_dsn(
        self, sub: drop.Submission, owner: str, refusal: Refused
    ) -> tuple[Envelope, Envelope, bytes]:
        """(the refused submission as an envelope, the DSN's envelope, its content)."""
        now = time.time()
        hostname = self.config.hostname
        to = drop.submitter(sub, owner, hostname)
        match = _STATUS.match(refusal.reply)
        status = match.group(1) if match else "5.0.0"
        failed = [
            Recipient(
                address=_printable(a),
                state=FAILED_RCPT,
                reply=refusal.reply,
                status=status,
                updated=now,
            )
            for a in sub.recipients[:MAX_LISTED]
        ]
        message_id = scan_headers(sub.content)[1] if sub.whole else None
        refused = Envelope(
            id=new_id(),
            sender=to,  # who the DSN goes to
            recipients=failed,
            arrival=sub.time if sub.time is not None else now,
            size=sub.size,
            client="local",
            helo=owner,
            message_id=message_id or None,
            source="local",
        )
        notice, content = build_notice(
            self.config,
            refused,
            failed,
            dsn.FAILED,
            sub.content,
            to=to,
            source=SOURCE_DSN,
            now=now,
            # Too big to take is too big to send back: its header section only.
            headers_only=True if status == "5.3.4" or not sub.whole else None,
        )
        return refused, notice, content

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.spool.dir(DROP), name))

    def _failed_again(self, name: str, error: Exception) -> bool:
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        log.event("spool_error", level=logging.ERROR, file=f"drop/{name[:64]}", error=repr(error))
        if count >= POISON_LIMIT:
            del self._failures[name]
            self._quarantine(name, f"failed {count} times: {error!r}")
        return False

    def _quarantine(self, name: str, reason: str) -> None:
        try:
            self.spool.set_aside(DROP, name, f"drop-{int(time.time())}-{name[:64]}")
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


def _printable(address: str) -> str:
    """An address from a refused record, fit for a report and a log line: what is not
    UTF-8 (a lone surrogate from JSON) escaped."""
    return address.encode("utf-8", "backslashreplace").decode("utf-8")
