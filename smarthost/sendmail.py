"""`smarthost-sendmail`: a sendmail-compatible submission into the spool's drop area.

It needs no running relay: the message is written to drop/ (`drop.write`: temp name,
fsync, rename, fsync the directory) and the command exits 0 only then, and only after
`drop.admit` made every check the relay's pickup will make (size, addresses, hop count,
whatever `submission.prepare` refuses): exit 0 means what `250` means. The relay picks
the file up at once when it runs (the watcher), or when it next starts.

`-bs` speaks SMTP on standard input and output instead (the default transport of
Symfony Mailer and Laravel): each message accepted with DATA goes through the same
checks and the same write, and its `250` comes only after the file is durable.

Exit codes follow sysexits.h: 64 usage, 65 a message the relay would refuse, 75 the
drop area cannot be written, 78 configuration.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses
from typing import BinaryIO

from . import drop, headers
from .config import Config, ConfigError, default_config_path, load_config
from .spool import DROP, Spool
from .submission import Refused

USAGE = (
    "usage: smarthost-sendmail [-C FILE] [-t] [-i | -oi] [-f SENDER] [-F FULLNAME] [-v] "
    "[--] [RECIPIENT ...]\n"
    "       smarthost-sendmail [-C FILE] [-F FULLNAME] -bs"
)
# Accepted for compatibility and ignored (delivery mode, error mode, body type...).
_IGNORED = {"-odi", "-odb", "-odq", "-oem", "-oee", "-oep", "-oeq", "-B8BITMIME", "-B7BIT"}
_IGNORED |= {"-bm", "-oi", "-om", "-U", "-Am", "-Ac"}


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
    smtp: bool = False  # -bs
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
        if arg in ("-t", "-i", "-v", "-bs"):
            opts.from_headers |= arg == "-t"
            opts.dot_ends &= arg != "-i"
            opts.verbose |= arg == "-v"
            opts.smtp |= arg == "-bs"
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
    for address in opts.recipients:
        check_address(address)
    if opts.sender is not None and opts.sender != "<>":
        check_address(opts.sender)
    if opts.full_name is not None and drop.unsafe_text(opts.full_name):
        raise UsageError("invalid full name (-F)")
    if opts.smtp and (opts.recipients or opts.from_headers):
        raise UsageError("-bs takes its recipients from RCPT TO, not from -t or arguments")
    return opts


def check_address(address: object) -> None:
    """No header or option injection through an address: the drop format's own check."""
    try:
        drop.check_address(address)
    except drop.BadAddress as exc:
        raise UsageError(str(exc)) from None


def _line(raw: bytes) -> bytes:
    """A line as read, with its line end (LF, CRLF or none) made CRLF."""
    return raw.rstrip(b"\r\n") + b"\r\n"


def read_message(stream, dot_ends: bool, limit: int) -> bytes:
    """stdin up to EOF (or a lone "." line), with CRLF line ends, at most `limit` bytes."""
    lines, size = [], 0
    for number, raw in enumerate(stream):
        line = _line(raw)
        if number == 0 and line.startswith(b"From "):
            continue  # an mbox separator, as sendmail and Postfix drop it
        if dot_ends and line == b".\r\n":
            break
        size += len(line)
        if size > limit:
            raise MessageError(f"message larger than the limit of {limit} bytes")
        lines.append(line)
    return b"".join(lines)


def invoking_user() -> str:
    return drop.user_name(os.getuid())


def qualified_sender(sender: str, hostname: str) -> str:
    """The envelope sender: "" for the null sender, a local name at this host."""
    sender = "" if sender == "<>" else sender
    return f"{sender}@{hostname}" if sender and "@" not in sender else sender


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


def accept(config: Config, sender: str, recipients: list[str], content: bytes) -> str:
    """Make every check the pickup will make (`drop.admit`), then write the drop file
    durably: its name. Raises Refused (the relay would refuse it) or OSError."""
    drop.admit(config, drop.Submission(sender, recipients, content), invoking_user())
    spool = Spool(config.spool.dir)
    if not os.path.isdir(spool.dir(DROP)) and os.geteuid() == 0:
        spool.create()
    return drop.write(spool, sender, recipients, content)


def submit(opts: Options, config: Config, stdin) -> str:
    content = read_message(stdin, opts.dot_ends, config.smtp.max_message_size)
    sender = opts.sender if opts.sender is not None else invoking_user()
    sender = qualified_sender(sender, config.hostname)
    recipients = list(opts.recipients)
    if opts.from_headers:
        recipients += recipients_from_headers(content)
        content = headers.remove(content, "bcc")
    for address in recipients:
        check_address(address)
    if not recipients:
        raise UsageError("no recipients (give them as arguments, or use -t)")
    content = complete_headers(content, sender or "MAILER-DAEMON", opts.full_name, config.hostname)
    return accept(config, sender, recipients, content)


# -- -bs: SMTP on standard input and output ---------------------------------------------

COMMAND_MAX = 2048  # octets of a command line (Postfix's line_length_limit)
DATA_PIECE = 65536
_NOT_IMPLEMENTED = frozenset({"VRFY", "EXPN", "HELP", "ETRN", "TURN", "STARTTLS", "AUTH", "BDAT"})


class _TooBig(Exception):
    """DATA went past max_message_size."""


class StdioSMTP:
    """A minimal, strict SMTP server dialogue (RFC 5321) on a pair of byte streams.

    EHLO/HELO, MAIL, RCPT, DATA (dot-unstuffed, line ends made CRLF), RSET, NOOP and
    QUIT, with enhanced status codes. A message accepted with DATA goes through
    `accept`, as one given on the command line does: its 250 means it is durably in the
    drop area and passed every check the relay will make.
    """

    def __init__(
        self, config: Config, rfile: BinaryIO, wfile: BinaryIO, full_name: str | None = None
    ) -> None:
        self.config = config
        self.rfile = rfile
        self.wfile = wfile
        self.full_name = full_name
        self.greeted = False
        self.sender: str | None = None  # set by MAIL
        self.smtputf8 = False
        self.recipients: list[str] = []

    def reply(self, *lines: str) -> None:
        """One reply of one or more `CODE TEXT` lines (all but the last get the dash)."""
        out = [f"{line[:3]}-{line[4:]}\r\n" for line in lines[:-1]] + [f"{lines[-1]}\r\n"]
        self.wfile.write("".join(out).encode("utf-8"))
        self.wfile.flush()

    def run(self) -> int:
        """Serve until QUIT or the end of the input: exit 0 (what was said stands)."""
        self.reply(f"220 {self.config.hostname} ESMTP smarthost-sendmail")
        while True:
            raw = self.rfile.readline(COMMAND_MAX + 1)
            if not raw:
                return os.EX_OK
            if not raw.endswith(b"\n") and len(raw) > COMMAND_MAX:
                while raw and not raw.endswith(b"\n"):
                    raw = self.rfile.readline(COMMAND_MAX + 1)
                self.reply("500 5.5.2 Error: line too long")
                continue
            try:
                line = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:
                self.reply("500 5.5.2 Error: not UTF-8")
                continue
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            handler = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
            if handler is None:
                if verb in _NOT_IMPLEMENTED:
                    self.reply("502 5.5.1 Error: command not implemented")
                else:
                    self.reply("500 5.5.2 Error: command not recognized")
                continue
            if handler(arg.strip(" ")) is False:
                return os.EX_OK

    def _reset(self) -> None:
        self.sender, self.smtputf8, self.recipients = None, False, []

    def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            self.reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self.greeted = True
        self._reset()
        self.reply(
            f"250 {self.config.hostname}",
            "250 PIPELINING",
            f"250 SIZE {self.config.smtp.max_message_size}",
            "250 8BITMIME",
            "250 SMTPUTF8",
            "250 ENHANCEDSTATUSCODES",
        )

    def smtp_HELO(self, arg: str) -> None:
        if not arg:
            self.reply("501 5.5.4 Syntax: HELO hostname")
            return
        self.greeted = True
        self._reset()
        self.reply(f"250 {self.config.hostname}")

    def smtp_NOOP(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.reply("501 5.5.4 Syntax: RSET")
            return
        self._reset()
        self.reply("250 2.0.0 Ok")

    def smtp_QUIT(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return False

    def smtp_MAIL(self, arg: str) -> None:
        if not self.greeted:
            self.reply("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.sender is not None:
            self.reply("503 5.5.1 Error: nested MAIL command")
            return
        path = _path(arg, "FROM")
        if path is None:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address, params = path
        smtputf8 = False
        for param in params:
            name, _, value = param.partition("=")
            name = name.upper()
            if name == "SIZE" and value.isdigit() and value.isascii():
                if int(value) > self.config.smtp.max_message_size:
                    self.reply("552 5.3.4 Error: message size exceeds fixed limit")
                    return
            elif name == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass  # the relay sees for itself whether a message is 8-bit
            elif name == "SMTPUTF8" and not value:
                smtputf8 = True
            else:
                self.reply(f"555 5.5.4 Error: unsupported parameter {param[:64]}")
                return
        if address:
            try:
                drop.check_address(address)
            except drop.BadAddress:
                self.reply("501 5.1.7 Error: bad sender address syntax")
                return
            if not smtputf8 and not address.isascii():
                self.reply("553 5.6.7 Error: a non-ASCII address needs SMTPUTF8 on MAIL")
                return
        self.sender = qualified_sender(address, self.config.hostname)
        self.smtputf8 = smtputf8
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        path = _path(arg, "TO")
        if path is None:
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, params = path
        if params:
            self.reply(f"555 5.5.4 Error: unsupported parameter {params[0][:64]}")
            return
        try:
            drop.check_address(address)
        except drop.BadAddress:
            self.reply("501 5.1.3 Error: bad recipient address syntax")
            return
        if not self.smtputf8 and not address.isascii():
            self.reply("553 5.6.7 Error: a non-ASCII address needs SMTPUTF8 on MAIL")
            return
        if len(self.recipients) >= self.config.smtp.max_recipients:
            self.reply("452 4.5.3 Error: too many recipients")
            return
        self.recipients.append(address)
        self.reply("250 2.1.5 Ok")

    def smtp_DATA(self, arg: str) -> bool | None:
        if arg:
            self.reply("501 5.5.4 Syntax: DATA")
            return None
        if self.sender is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return None
        if not self.recipients:
            self.reply("554 5.5.1 Error: no valid recipients")
            return None
        sender, recipients = self.sender, self.recipients
        self._reset()
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = self._read_data()
        except _TooBig:
            self.reply("552 5.3.4 Error: message size exceeds fixed limit")
            return None
        if content is None:
            return False  # the input ended inside DATA: nothing was promised
        hostname = self.config.hostname
        content = complete_headers(content, sender or "MAILER-DAEMON", self.full_name, hostname)
        try:
            name = accept(self.config, sender, recipients, content)
        except Refused as exc:
            print(f"smarthost-sendmail: message refused: {exc}", file=sys.stderr)
            self.reply(exc.reply)
            return None
        except OSError as exc:
            print(f"smarthost-sendmail: cannot write the drop area: {exc}", file=sys.stderr)
            self.reply("451 4.3.0 Error: cannot write the drop area, try again later")
            return None
        self.reply(f"250 2.0.0 Ok: queued as {name}")
        return None

    def _read_data(self) -> bytes | None:
        """The message up to the lone-dot line, dot-unstuffed, with CRLF line ends; None
        if the input ends first. Past max_message_size the rest is read to the end of
        DATA and thrown away, then _TooBig is raised."""
        limit = self.config.smtp.max_message_size
        pieces: list[bytes] = []
        size, at_line_start, held_cr = 0, True, b""
        while True:
            piece = self.rfile.readline(DATA_PIECE)
            if not piece:
                return None
            piece, held_cr = held_cr + piece, b""
            ended = piece.endswith(b"\n")
            if at_line_start and piece in (b".\r\n", b".\n"):
                break
            if at_line_start and piece.startswith(b"."):
                piece = piece[1:]
            if ended:
                piece = _line(piece)
            elif piece.endswith(b"\r"):
                piece, held_cr = piece[:-1], b"\r"  # maybe a CRLF split between reads
            at_line_start = ended
            size += len(piece)
            if size <= limit:
                pieces.append(piece)
            elif pieces:
                pieces = []
        if size > limit:
            raise _TooBig
        return b"".join(pieces)


def _path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """`FROM:<address> PARAM...` (or `TO:`): the address and the parameters."""
    head, colon, rest = arg.partition(":")
    if not colon or head.strip(" ").upper() != keyword:
        return None
    rest = rest.lstrip(" ")
    end = rest.find(">")
    if not rest.startswith("<") or end < 0:
        return None
    params = rest[end + 1 :]
    if params and not params.startswith(" "):
        return None
    return rest[1:end], [param for param in params.split(" ") if param]


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"smarthost-sendmail: {exc}\n{USAGE}", file=sys.stderr)
        return os.EX_USAGE
    try:
        config = load_config(default_config_path(opts.config))
    except ConfigError as exc:
        print(f"smarthost-sendmail: {exc.errors[0]}", file=sys.stderr)
        if opts.smtp:
            out = stdout or sys.stdout.buffer
            out.write(b"421 4.3.0 Error: the mail system is not configured\r\n")
            out.flush()
        return os.EX_CONFIG
    if opts.smtp:
        rfile, wfile = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
        return StdioSMTP(config, rfile, wfile, opts.full_name).run()
    try:
        name = submit(opts, config, stdin or sys.stdin.buffer)
    except UsageError as exc:
        print(f"smarthost-sendmail: {exc}", file=sys.stderr)
        return os.EX_USAGE
    except MessageError as exc:
        print(f"smarthost-sendmail: {exc}", file=sys.stderr)
        return os.EX_DATAERR
    except Refused as exc:
        print(f"smarthost-sendmail: message refused: {exc} ({exc.reply})", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"smarthost-sendmail: cannot write the drop area: {exc}", file=sys.stderr)
        return os.EX_TEMPFAIL
    if opts.verbose:
        print(f"smarthost-sendmail: queued as {name} in {config.spool.dir}/drop", file=sys.stderr)
    return os.EX_OK
