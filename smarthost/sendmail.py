"""`smarthost-sendmail`: a sendmail-compatible submission into the spool's drop area.

It needs no running relay: the message is written to drop/ (temp name, fsync, rename,
fsync the directory) and the command exits 0 only then. The relay picks it up at once
when it runs (the watcher), or when it next starts. Exit codes follow sysexits.h:
64 usage, 65 bad message, 75 the drop area cannot be written, 78 configuration.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses

from . import headers
from .config import Config, ConfigError, default_config_path, load_config
from .spool import DROP, Spool, fsync_dir

EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 75, 78
DROP_MAGIC = b"SMARTHOST-DROP 1\n"
DROP_SUFFIX = ".drop"
USAGE = (
    "usage: smarthost-sendmail [-C FILE] [-t] [-i | -oi] [-f SENDER] [-F FULLNAME] [-v] "
    "[--] [RECIPIENT ...]"
)
# Accepted for compatibility and ignored (delivery mode, error mode, body type...).
_IGNORED = {"-odi", "-odb", "-odq", "-oem", "-oee", "-oep", "-oeq", "-B8BITMIME", "-B7BIT"}
_IGNORED |= {"-bm", "-oi", "-om", "-U", "-Am", "-Ac"}


_SPECIALS = frozenset(' \t,;:<>()[]"\\')


class UsageError(Exception):
    """Bad command line (exit 64)."""


class MessageError(Exception):
    """A message that cannot be submitted as given (exit 65)."""


@dataclass
class Options:
    config: str | None = None
    from_headers: bool = False  # -t
    dot_ends: bool = True  # without -i, a line with a single "." ends the message
    sender: str | None = None
    full_name: str | None = None
    verbose: bool = False
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's option syntax: `-fADDR` or `-f ADDR`, clustered letters are not."""
    opts, args = Options(), list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.recipients.extend(args)
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        if arg in _IGNORED:
            if arg == "-oi":
                opts.dot_ends = False
            continue
        if arg in ("-t", "-i", "-v"):
            opts.from_headers |= arg == "-t"
            opts.dot_ends &= arg != "-i"
            opts.verbose |= arg == "-v"
            continue
        flag, value = arg[:2], arg[2:]
        if flag in ("-f", "-r", "-F", "-C"):
            if not value:
                if not args:
                    raise UsageError(f"option {flag} needs a value")
                value = args.pop(0)
            if flag == "-C":
                opts.config = value
            elif flag == "-F":
                opts.full_name = value
            else:
                opts.sender = value
            continue
        if arg.startswith(("-o", "-B")):
            continue  # other -oX / -BX settings: harmless, ignored like the listed ones
        raise UsageError(f"unknown option {arg}")
    for address in [*opts.recipients, opts.sender or "x"]:
        check_address(address)
    if opts.full_name is not None and _unsafe(opts.full_name):
        raise UsageError("invalid full name (-F)")
    return opts


def check_address(address: object) -> None:
    """No header or option injection through an address."""
    if not isinstance(address, str) or _unsafe(address) or address.startswith("-"):
        raise UsageError(f"invalid address {address!r}")
    if address != "<>" and any(c in _SPECIALS or c.isspace() for c in address):
        # A display name, comment, list ("a@b, c@d") or quoting: SMTP would carry
        # another address than the one given (smtplib re-parses it).
        raise UsageError(f"invalid address {address!r}")


def _unsafe(text: str) -> bool:
    """Control characters (header or SMTP injection), too long, or not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text) or len(text) > 998


def read_message(stream, dot_ends: bool, limit: int) -> bytes:
    """stdin up to EOF (or a lone "." line), with CRLF line ends, at most `limit` bytes."""
    lines, size = [], 0
    for number, raw in enumerate(stream):
        line = raw.rstrip(b"\r\n")
        if number == 0 and line.startswith(b"From "):
            continue  # an mbox separator, as sendmail and Postfix drop it
        if dot_ends and line == b".":
            break
        size += len(line) + 2
        if size > limit:
            raise MessageError(f"message larger than the limit of {limit} bytes")
        lines.append(line + b"\r\n")
    return b"".join(lines)


def invoking_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def complete_headers(content: bytes, sender: str, full_name: str | None, hostname: str) -> bytes:
    """Add From:, Date: and Message-ID: where missing, as sendmail does."""
    present = {f.name for f in headers.fields(content)}
    added = []
    if "from" not in present:
        address = sender if "@" in sender else f"{sender}@{hostname}"
        added.append(f"From: {_from_value(full_name, address) if full_name else address}")
    if "date" not in present:
        added.append(f"Date: {headers.date_now()}")
    if "message-id" not in present:
        added.append(
            f"Message-ID: <{time.strftime('%Y%m%d%H%M%S')}.{secrets.token_hex(6)}@{hostname}>"
        )
    if not headers.fields(content) and not content.startswith((b"\r\n", b"\n")):
        content = b"\r\n" + content  # no header section at all: the text is all body
    return "".join(f"{line}\r\n" for line in added).encode() + content


def _from_value(full_name: str, address: str) -> str:
    """`Name <address>`; formataddr wants an ASCII address, an SMTPUTF8 one is kept."""
    try:
        return formataddr((full_name, address))
    except UnicodeEncodeError:
        return formataddr((full_name, "x@x")).replace("<x@x>", f"<{address}>")


def recipients_from_headers(content: bytes) -> list[str]:
    """-t: every address in To, Cc and Bcc."""
    values = [f.text for f in headers.fields(content) if f.name in ("to", "cc", "bcc")]
    return [address for _, address in getaddresses(values) if address]


def drop(spool: Spool, sender: str, recipients: list[str], content: bytes) -> str:
    """Write one submission durably into drop/; its file name."""
    directory = spool.dir(DROP)
    name = secrets.token_hex(16)
    tmp = os.path.join(directory, f".tmp-{name}")
    record = json.dumps({"sender": sender, "recipients": recipients, "time": time.time()})
    # 0644 and not 0600: the relay, running as its own user, must read it. Nobody
    # else can find it: drop/ cannot be listed, and the name is 128 random bits.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the caller's umask
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(DROP_MAGIC + record.encode() + b"\n" + content)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    final = name + DROP_SUFFIX
    os.rename(tmp, os.path.join(directory, final))
    _fsync_directory(directory)
    return final


def _fsync_directory(directory: str) -> None:
    """Make the new name durable. A local user may not open drop/ (it cannot be listed,
    on purpose), so cannot fsync it: then sync(2) flushes it, slower but sure."""
    try:
        fsync_dir(directory)
    except PermissionError:
        os.sync()  # the only way left to make the rename durable


def submit(opts: Options, config: Config, stdin) -> str:
    content = read_message(stdin, opts.dot_ends, config.smtp.max_message_size)
    sender = opts.sender if opts.sender is not None else invoking_user()
    sender = "" if sender == "<>" else sender
    if sender and "@" not in sender:
        sender = f"{sender}@{config.hostname}"  # a local name: this host's (then masqueraded)
    recipients = list(opts.recipients)
    if opts.from_headers:
        recipients += recipients_from_headers(content)
        content = headers.remove(content, "bcc")
    for address in recipients:
        check_address(address)
    if not recipients:
        raise UsageError("no recipients (give them as arguments, or use -t)")
    content = complete_headers(content, sender or "MAILER-DAEMON", opts.full_name, config.hostname)
    spool = Spool(config.spool.dir)
    if not os.path.isdir(spool.dir(DROP)) and os.geteuid() == 0:
        spool.create()
    return drop(spool, sender, recipients, content)


def main(argv: Sequence[str] | None = None, stdin=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"smarthost-sendmail: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    try:
        config = load_config(default_config_path(opts.config))
    except ConfigError as exc:
        print(f"smarthost-sendmail: {exc.errors[0]}", file=sys.stderr)
        return EX_CONFIG
    try:
        name = submit(opts, config, stdin or sys.stdin.buffer)
    except UsageError as exc:
        print(f"smarthost-sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    except MessageError as exc:
        print(f"smarthost-sendmail: {exc}", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:
        print(f"smarthost-sendmail: cannot write the drop area: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    if opts.verbose:
        print(f"smarthost-sendmail: queued as {name} in {config.spool.dir}/drop", file=sys.stderr)
    return EX_OK
