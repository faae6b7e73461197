"""The drop-file format: local submissions waiting in the spool's drop area.

`smarthost-sendmail` writes one file per message into the spool's ``drop/``
(`spool.DROP`); the relay's pickup reads it, checks it again, queues it and removes it;
`smarthost queue list` shows it meanwhile (state ``dropped``). This module is the
format's one description and the only code that writes, reads or lists drop files.

A drop file::

    name       32 lower-case hex digits (128 random bits) and ".drop"; while being
               written ".tmp-" and the same digits (never read; removed after an hour)
    line 1     the magic line  SMARTHOST-DROP 1  and LF
    line 2     the record: one JSON object, UTF-8, on one line ending in LF, at most
               RECORD_MAX bytes:
                 {"sender": "alice@example.com", "recipients": ["bob@example.net"],
                  "time": 1764064800.25}
               sender: the envelope sender ("" for the null sender); recipients: a
               non-empty list of addresses as given (not yet aliased or masqueraded);
               time: when the file was written (seconds since the epoch). Other keys
               are ignored (room to grow).
    the rest   the message as it is to be queued: CRLF line ends, its header section
               complete (sendmail adds From:, Date: and Message-ID: where missing)

Writing (`write`): a ``.tmp-`` name, created O_EXCL|O_NOFOLLOW, mode 0644 whatever the
umask (the relay runs as its own user and must read it; nobody else can find it, since
drop/ cannot be listed and the name is 128 random bits), written, fsynced, renamed to
its final name, and the rename made durable (drop/ fsynced, or sync(2) for a user who
may not open drop/). The submitter is told "accepted" only after that.

Reading (`read`): every file is untrusted input from some local user. It is opened
without following links and without blocking (a FIFO cannot stall the reader), and only
a regular file with one link is read, at most `limit` bytes (past that, only its head).

Two kinds of bad file, kept apart:

* `NotADrop`: not a submission at all (a bad name, a link, a FIFO, a hard link, no
  magic line, a record that is not such an object). The pickup moves it to corrupt/.
* `submission.Refused` from `admit`: a submission the relay will not queue (an invalid
  address, too big, a mail loop, whatever `submission.prepare` refuses). sendmail makes
  the same `admit` call before it writes the file, so its exit 0 means what a 250
  means; a file that is still refused at pickup (the config changed, or the file was
  crafted) is bounced to its submitter (`submitter`), never set aside in silence.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import secrets
import stat
import time
import unicodedata
from dataclasses import dataclass, field, replace

from . import headers
from .config import Config
from .spool import DROP, Envelope, Recipient, Spool, fsync_dir, new_id
from .submission import Refused, prepare

MAGIC = b"SMARTHOST-DROP 1\n"
SUFFIX = ".drop"
TMP_PREFIX = ".tmp-"
RECORD_MAX = 1 << 20  # bytes of the JSON record: tens of thousands of recipients
HEADER_ROOM = 8192  # for the From:, Date: and Message-ID: sendmail adds after its size check
HEAD_READ = 64 * 1024  # of a file too large to read whole: the message's head only
FILE_MODE = 0o644

_NAME = re.compile(r"[0-9a-f]{32}\.drop\Z")
_SPECIALS = frozenset(' \t,;:<>()[]"\\')


class NotADrop(ValueError):
    """The file is not a submission at all: it belongs in corrupt/."""


class BadAddress(ValueError):
    """An address no submission may carry (injection, a list, a display name...)."""


@dataclass
class Submission:
    """What one drop file holds."""

    sender: str
    recipients: list[str]
    content: bytes  # the message; only its head when `whole` is False
    size: int = -1  # of the message in the file (-1: len(content))
    time: float | None = None  # when it was written, as the record says
    whole: bool = True

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.content)


@dataclass
class Entry:
    """A drop file as `queue list` shows it (state ``dropped``)."""

    name: str  # the file name in drop/
    id: str  # its 32 hex digits: it has no queue ID yet
    arrival: float  # the record's time, else the file's mtime
    size: int  # of the message
    sender: str
    recipients: list[str]
    owner: str  # the submitting user


@dataclass
class Listing:
    """`list_entries`: the readable entries, and (name, reason) for every other one."""

    entries: list[Entry] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


# -- names and addresses ----------------------------------------------------------------


def is_drop_name(name: str) -> bool:
    return _NAME.match(name) is not None


def is_tmp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def check_address(address: object) -> None:
    """Raise BadAddress unless `address` is one plain address: no header or option
    injection, no list, display name, comment or quoting (SMTP would carry another
    address than the one given), valid UTF-8, at most 998 characters."""
    if not isinstance(address, str) or not address or unsafe_text(address):
        raise BadAddress(f"invalid address {address!r}")
    if address.startswith("-") or any(c in _SPECIALS or c.isspace() for c in address):
        raise BadAddress(f"invalid address {address!r}")


def unsafe_text(text: str) -> bool:
    """Control characters (header or SMTP injection), too long, or not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text) or len(text) > 998


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


# -- the checks, made by sendmail before it writes and by the pickup after it reads -------


def admit(
    config: Config, sub: Submission, owner: str, queue_id: str | None = None
) -> tuple[Envelope, list[bytes]]:
    """The envelope and content parts a submission becomes in the queue, or Refused.

    Every check the relay makes of a local submission is here or in
    `submission.prepare` (which mail from SMTP goes through too): sendmail calls this
    before it writes the file and exits 0, the pickup after it reads it.
    """
    if not sub.recipients:
        raise Refused("no recipients", "554 5.5.1 Error: no valid recipients")
    try:
        if sub.sender:  # "" is the null sender
            check_address(sub.sender)
    except BadAddress as exc:
        raise Refused(f"sender: {exc}", "553 5.1.7 Error: bad sender address syntax") from None
    try:
        for address in sub.recipients:
            check_address(address)
    except BadAddress as exc:
        reply = "553 5.1.3 Error: bad recipient address syntax"
        raise Refused(f"recipient: {exc}", reply) from None
    if len(record(sub.sender, sub.recipients, 0.0)) > RECORD_MAX:
        raise Refused("too many recipients", "554 5.5.3 Error: too many recipients")
    limit = config.smtp.max_message_size
    if sub.size > limit + HEADER_ROOM or not sub.whole:
        raise Refused(
            f"message larger than the limit of {limit} bytes",
            "552 5.3.4 Error: message size exceeds fixed maximum message size",
        )
    queue_id = queue_id or new_id()
    submitted = Envelope(
        id=queue_id,
        sender=sub.sender,
        recipients=[Recipient(address=a) for a in sub.recipients],
        arrival=time.time(),
        client="local",
        helo=owner,
        source="local",
        smtputf8=not all(a.isascii() for a in (sub.sender, *sub.recipients)),
    )
    received = (
        f"Received: by {config.hostname} (smarthost, from userid {owner})\r\n"
        f"\tid {queue_id}; {headers.date_now()}\r\n"
    ).encode()
    env, parts = prepare(config, submitted, received, sub.content)
    if not all(part.isascii() for part in parts):
        env = replace(env, body="8BITMIME")  # as Postfix's pickup marks 8-bit mail
        if _utf8_header(parts[-1]):
            # RFC 6532 header fields: a local program cannot say SMTPUTF8, its mail can.
            env = replace(env, smtputf8=True)
    try:
        env.to_bytes()
    except (ValueError, TypeError) as exc:  # an envelope that cannot be stored
        raise Refused(f"cannot be queued: {exc}") from None
    return env, parts


def _utf8_header(content: bytes) -> bool:
    """The header section holds non-ASCII text in UTF-8 (not legacy 8-bit bytes)."""
    header = content[: headers.section_end(content)]
    if header.isascii():
        return False
    try:
        header.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def submitter(sub: Submission, owner: str, hostname: str) -> str:
    """Who hears about a refused submission: its sender, else the user who dropped it."""
    if sub.sender:
        try:
            check_address(sub.sender)
            return sub.sender if "@" in sub.sender else f"{sub.sender}@{hostname}"
        except BadAddress:
            pass
    return f"{owner}@{hostname}"


# -- writing -------------------------------------------------------------------------------


def record(sender: str, recipients: list[str], now: float) -> bytes:
    """The record line, without its LF."""
    fields = {"sender": sender, "recipients": recipients, "time": now}
    return json.dumps(fields, ensure_ascii=True).encode()


def encode(sender: str, recipients: list[str], content: bytes, now: float | None = None) -> bytes:
    """A drop file's bytes."""
    line = record(sender, recipients, time.time() if now is None else now)
    return MAGIC + line + b"\n" + content


def write(spool: Spool, sender: str, recipients: list[str], content: bytes) -> str:
    """Write one submission durably into drop/; its file name. OSError if it cannot."""
    directory = spool.dir(DROP)
    name = secrets.token_hex(16)
    tmp = os.path.join(directory, TMP_PREFIX + name)
    data = encode(sender, recipients, content)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the caller's umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    final = name + SUFFIX
    os.rename(tmp, os.path.join(directory, final))
    _fsync_directory(directory)
    return final


def _fsync_directory(directory: str) -> None:
    """Make the new name durable. A local user may not open drop/ (it cannot be listed,
    on purpose), so cannot fsync it: then sync(2) flushes it, slower but sure."""
    try:
        fsync_dir(directory)
    except PermissionError:
        os.sync()


# -- reading -------------------------------------------------------------------------------


def read(
    directory: str, name: str, limit: int, head: int = HEAD_READ
) -> tuple[Submission, os.stat_result]:
    """Open, check and parse one drop file: the submission and the file's stat.

    A file of more than `limit` bytes is not read whole: only its record and `head`
    bytes of its message (`Submission.whole` False, `size` the message's full size).
    Raises NotADrop, FileNotFoundError if it is gone, other OSError (EMFILE, EIO...)
    for what is not the file's fault.
    """
    if not is_drop_name(name):
        raise NotADrop("not a drop file name")
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM, errno.EISDIR):
            raise NotADrop(f"cannot open: {exc.strerror}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotADrop("not a regular file")
        if info.st_nlink != 1:
            raise NotADrop("a file with other names (hard links)")
        if info.st_size <= limit:
            data = _read_up_to(fd, limit + 1)
            if len(data) <= limit:
                return decode(data), info
        else:
            data = b""
        data += _read_record(fd, data)  # too large (or grew while read): the head only
        data += _read_up_to(fd, head)
    finally:
        os.close(fd)
    return decode(data, max(info.st_size, len(data)), whole=False), info


def _read_up_to(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_record(fd: int, data: bytes) -> bytes:
    """What to read after `data` to have the magic line and the whole record line."""
    buf, searched = bytearray(data), len(MAGIC)
    while buf.find(b"\n", searched) < 0 and len(buf) <= len(MAGIC) + RECORD_MAX:
        searched = max(searched, len(buf))
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return bytes(buf[len(data) :])


def decode(data: bytes, file_size: int | None = None, whole: bool = True) -> Submission:
    """Parse a drop file's bytes (or its head, with `whole` False and the file's size)."""
    if not data.startswith(MAGIC):
        raise NotADrop("no drop record")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + RECORD_MAX + 1)
    if end < 0:
        if len(data) > len(MAGIC) + RECORD_MAX:
            raise NotADrop(f"drop record longer than {RECORD_MAX} bytes")
        raise NotADrop("truncated drop record")
    try:
        fields = json.loads(data[len(MAGIC) : end])
    except (ValueError, RecursionError) as exc:
        raise NotADrop(f"bad drop record: {exc}") from None
    if not isinstance(fields, dict):
        raise NotADrop("bad drop record: not a JSON object")
    sender, recipients = fields.get("sender"), fields.get("recipients")
    if not isinstance(sender, str):
        raise NotADrop("bad drop record: the sender is not a string")
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise NotADrop("bad drop record: the recipients are not a list of strings")
    if not recipients:
        raise NotADrop("bad drop record: no recipients")
    written = fields.get("time")
    if isinstance(written, bool) or not isinstance(written, (int, float)):
        written = None
    content = data[end + 1 :]
    size = len(content) if file_size is None else file_size - end - 1
    return Submission(sender, recipients, content, size, written, whole)


# -- listing -------------------------------------------------------------------------------


def list_entries(spool: Spool) -> Listing:
    """Every submission waiting in drop/, read from its record only (never its message),
    and a (name, reason) problem for each file that is not one; never raises for what
    is in the directory. Files being written (``.tmp-``) are skipped. A drop/ that does
    not exist is empty; one that cannot be listed is a problem named ``""``."""
    directory = spool.dir(DROP)
    listing = Listing()
    try:
        with os.scandir(directory) as found:
            names = sorted(e.name for e in found)
    except FileNotFoundError:
        return listing
    except OSError as exc:
        listing.problems.append(("", f"cannot list {directory}: {exc.strerror or exc}"))
        return listing
    for name in names:
        if is_tmp_name(name):
            continue
        try:
            sub, info = read(directory, name, 0, head=0)  # the record only
        except FileNotFoundError:
            continue  # taken in meanwhile
        except (NotADrop, OSError) as exc:
            reason = str(exc) if isinstance(exc, NotADrop) else (exc.strerror or repr(exc))
            listing.problems.append((name, reason))
            continue
        listing.entries.append(
            Entry(
                name=name,
                id=name[: -len(SUFFIX)],
                arrival=sub.time if sub.time is not None else info.st_mtime,
                size=sub.size,
                sender=sub.sender,
                recipients=list(sub.recipients),
                owner=user_name(info.st_uid),
            )
        )
    listing.entries.sort(key=lambda e: e.arrival)
    return listing
