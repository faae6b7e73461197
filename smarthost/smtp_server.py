"""The aiosmtpd adaptation: the SMTP protocol as the relay speaks it, and its listeners.

aiosmtpd runs the dialogue; the policy lives in the handler (receiver.py). This module
is what hooks cannot do, and the only one that touches aiosmtpd's internals:

- DATA is streamed: the socket is read in pieces of up to `READ_LIMIT` bytes, dots are
  unstuffed and line endings normalised on the fly (`DataDecoder`), bytes are counted
  against `max_message_size` as they arrive, and the handler's intake takes them as they
  come. Past the limit nothing more is stored; the rest is read and discarded.
- `smtp.timeout` is the longest a client may stay silent: between commands, during the
  TLS handshake, between reads inside DATA. Then `421 4.4.2` and the session ends.
- Every session has one owner of its client slot, its task: the slot is given back
  when that task ends, however it ends (a timeout, a reset, an abandoned handshake).
- `error_limit` error replies end a session; every 4xx/5xx reply carries an enhanced
  status code and is logged as `rejected`.
- One event loop, in one thread, serves every `smtp.listen` address.
- PROXY protocol (`smtp.proxy_protocol`, SPEC §4): aiosmtpd reads the v1/v2 header
  (`proxy_protocol_timeout`) and asks the handler's `handle_PROXY`, which adopts the
  header's client address as the session's peer (`adopt_proxied_client`), so `allow`,
  logs and `Received:` see the real client. A connection from outside `proxy_from` is
  refused before anything is read; one without a valid header is closed and logged.

aiosmtpd internals used here (and checked by tests/test_smtp_server.py, which fails
loudly when a release changes them): `_timeout_handle`, `_timeout_cb`,
`_reset_timeout`, `_handler_coroutine`, `_original_transport`, `_tls_protocol`,
`_reader`, `_getaddr`, `_call_handler_hook`; and asyncio's: the socket transport's
`max_size` (how much one read asks for). setup.py pins the aiosmtpd range.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import os
import re
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax

from . import __version__, log
from .dsn import take_dsn_params

IDENT = f"ESMTP smarthost {__version__}"
# The reader's limit: the longest command line it buffers, and the size of the pieces
# DATA is read in; asyncio pauses the socket past twice this much read ahead.
READ_LIMIT = 64 * 1024
END_OF_DATA = b"\r\n.\r\n"
_DOT_LINE_END = b".\r\n"
_YIELD_EVERY = 256  # pieces of DATA read without giving other sessions a turn


def _read_in_small_pieces(transport: asyncio.BaseTransport) -> None:
    """asyncio's socket transport reads with recv(256 KiB): glibc serves a buffer that
    large with mmap and munmap, at every read, even for a 6-byte command (~16 µs a
    read, against ~3 µs for 64 KiB, which comes from the heap). READ_LIMIT is as much
    as the session takes at a time anyway."""
    if getattr(transport, "max_size", 0) > READ_LIMIT:
        transport.max_size = READ_LIMIT  # type: ignore[attr-defined]


class _QuietDeprecations(logging.Filter):
    """aiosmtpd warns about its own deprecated attribute on every successful login,
    and about a bad PROXY header, which the relay logs itself as `protocol_error`."""

    _SAID_ELSEWHERE = ("login_data is deprecated", "invalid PROXY handshake")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self._SAID_ELSEWHERE)


logging.getLogger("mail.log").addFilter(_QuietDeprecations())

# How long a proxy may take to send its header: aiosmtpd warns below 3 seconds.
PROXY_HEADER_TIMEOUT = (3.0, 10.0)

# RFC 2034: with ENHANCEDSTATUSCODES advertised, replies carry a status code. aiosmtpd's
# own replies do not, so the subclass adds the usual one for the basic code.
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "534": "5.7.9",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.5.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}(\s|$)")
# Control characters, and the surrogates aiosmtpd decodes non-UTF-8 bytes to.
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def with_enhanced_code(reply: str) -> str:
    """Insert the enhanced status code a reply lacks (`552 Too much` → `552 5.3.4 Too much`)."""
    code = reply[:3]
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None or _HAS_ENHANCED.match(reply):
        return reply
    sep, text = reply[3:4] or " ", reply[4:]
    return f"{code}{sep}{enhanced} {text}".rstrip()


def client_ip(peer: Any) -> str | None:
    """The address part of a socket peer name."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def in_networks(ip: str | None, networks: tuple[Any, ...]) -> bool:
    """The address (a link-local one's scope aside) is in one of `networks`."""
    if ip is None:
        return False
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def adopt_proxied_client(session: Any, proxy_data: Any) -> bool:
    """After a valid PROXY header, the client is the one it names: the session's
    `peer` becomes that address. A header for the proxy's own connection (v2 LOCAL,
    v1 UNKNOWN: a health check) leaves the proxy as the peer."""
    if not proxy_data.valid:
        return False
    if proxy_data.src_addr is not None and proxy_data.command != 0:  # 0: v2 LOCAL
        session.peer = (str(proxy_data.src_addr), proxy_data.src_port)
    return True


class ClientSlots:
    """Counts client sessions across every listener, for `smtp.max_clients`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count -= 1


# -- DATA on the wire ---------------------------------------------------------------


MAX_LINE = 998  # octets of a line without its CRLF (RFC 5321 §4.5.3.1.6, RFC 5322 §2.1.1)


class BareNewline(ValueError):
    """A bare CR or LF in DATA, with `bare_newlines = "reject"`."""


class LineTooLong(ValueError):
    """A line of the message is longer than MAX_LINE octets."""


class DataDecoder:
    """RFC 5321 §4.5.2 in reverse, on a stream: DATA as read (without its final
    `.CRLF`) → the message, dots unstuffed, every line ending CRLF.

    Pieces may split anywhere: a CR that ends one piece is held until the next shows
    whether an LF follows, and a line that starts a piece is known to start a line.
    `normalize`: a bare LF or bare CR becomes CRLF (no smuggling past this hop);
    otherwise one raises BareNewline.
    """

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self._held_cr = False
        self._line_start = True
        self._line_length = 0  # of the line not yet ended

    def feed(self, piece: bytes) -> bytes:
        """The message bytes that `piece` completes."""
        if self._held_cr:
            piece = b"\r" + piece
            self._held_cr = False
        if piece.endswith(b"\r"):
            piece = piece[:-1]
            self._held_cr = True
        if not piece:
            return b""
        lines = piece.split(b"\r\n")
        if _bare_line_ending(piece, lines):
            if not self.normalize:
                raise BareNewline("bare CR or LF in DATA")
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            lines = piece.split(b"\r\n")
        self._check_lines(lines)
        starts_line, self._line_start = self._line_start, piece.endswith(b"\n")
        if starts_line and piece.startswith(b"."):
            piece = piece[1:]
        if b"\r\n." in piece:
            piece = piece.replace(b"\r\n.", b"\r\n")
        return piece

    def _check_lines(self, lines: list[bytes]) -> None:
        """Raise LineTooLong for a line over MAX_LINE octets (and a transparency dot),
        also one that spans pieces. `lines`: a piece split at its CRLFs."""
        first = self._line_length + len(lines[0])
        self._line_length = first if len(lines) == 1 else len(lines[-1])
        if max(first, max(map(len, lines))) > MAX_LINE + 1:
            raise LineTooLong(f"a line of the message is longer than {MAX_LINE} octets")

    def close(self) -> bytes:
        """What is still held at the end of DATA (a lone CR, as a line ending)."""
        if not self._held_cr:
            return b""
        self._held_cr = False
        if not self.normalize:
            raise BareNewline("bare CR in DATA")
        return b"\r\n"


def _bare_line_ending(piece: bytes, lines: list[bytes]) -> bool:
    """Does `piece` (split at its CRLFs into `lines`) hold a bare CR or LF? Joining the
    lines shows what is left of any line ending at C speed; for thousands of short
    lines (a flood of empty ones) joining costs megabytes, and two counts do."""
    if len(lines) > 2048:
        crlf = len(lines) - 1
        return piece.count(b"\n") != crlf or piece.count(b"\r") != crlf
    rest = b"".join(lines)
    return b"\r" in rest or b"\n" in rest


def _may_begin_end(data: bytes, dotless: bool = False) -> int:
    """How many of the last bytes of `data` could be the beginning of CRLF . CRLF
    (`dotless`: only a CR or a CRLF)."""
    for n in range(2 if dotless else len(END_OF_DATA) - 1, 0, -1):
        if data.endswith(END_OF_DATA[:n]):
            return n
    return 0


async def read_data(
    reader: asyncio.StreamReader,
    take: Callable[[bytes], Awaitable[None] | None],
    progress: Callable[[], None],
) -> None:
    """Read DATA up to CRLF . CRLF, handing the message to `take` in pieces (with the
    last line's CRLF, without the `.CRLF`), calling `progress()` after every read.
    When `take` returns an awaitable, nothing more is read until it is done.

    The end is looked for by the reader itself (readuntil), which never reads past it:
    commands a client pipelines after the dot stay for the session. Bytes that could
    be the beginning of the end are held back until the next read tells. While they
    are held, the reader looks for `.CRLF` (the held CRLF's dot is still unread); else
    for the whole CRLF . CRLF, in pieces of up to the reader's limit. Just after a line
    end, the next 3 bytes are read on their own: there are always 3 (`.CRLF`, or more
    content and a whole CRLF . CRLF), and they usually end the `.CRLF` search.
    Raises asyncio.IncompleteReadError if the connection ends first.
    """
    held = b"\r\n"  # read but not yet taken
    virtual = 2  # the first bytes held are DATA's own line end, not the message's
    peeked = False
    pieces = 0

    async def give(data: bytes) -> None:
        nonlocal virtual
        data, virtual = data[virtual:], 0
        if data:
            pending = take(data)
            if pending is not None:  # `take` works on it off the loop: wait before reading on
                await pending

    while True:
        if b"." in held:  # CRLF . or CRLF . CR read: only the next bytes can tell
            data = held + await reader.readexactly(len(END_OF_DATA) - len(held))
            if data == END_OF_DATA:
                await give(b"\r\n")
                return
        elif held == b"\r\n" and not peeked:
            data = held + await reader.readexactly(3)
            if data == END_OF_DATA:
                await give(b"\r\n")
                return
            peeked = True
        else:
            peeked = False
            separator = _DOT_LINE_END if held else END_OF_DATA
            try:
                data = held + await reader.readuntil(separator)
            except asyncio.LimitOverrunError as overrun:
                data = held + await reader.read(overrun.consumed)
                # No separator begins in what was read: with CRLF . CRLF looked for,
                # nothing of it is the end; with .CRLF, at most a last CR or CRLF.
                keep = _may_begin_end(data, dotless=True) if held else 0
            else:
                if data.endswith(END_OF_DATA):
                    await give(data[:-3])
                    progress()
                    return
                keep = 2  # it ends with CRLF, which the end may follow
            await give(data[: len(data) - keep])
            held = data[len(data) - keep :]
            progress()
            pieces += 1
            if pieces % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # short pieces come without a wait: let others run
            continue
        keep = _may_begin_end(data)
        await give(data[: len(data) - keep])
        held = data[len(data) - keep :]
        progress()


# -- the protocol ---------------------------------------------------------------------

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# `<local@domain>` with a dot-atom local part and a host name: group 2 is the "@".
SIMPLE_PATH = re.compile(
    rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*(@){_LABEL}(?:\.{_LABEL})*)>[ \t]*((?:[A-Za-z0-9][ -~]*)?)\Z"
)


# RFC 5321 §4.1.2 (with RFC 6531's UTF-8): the slow path's parse of a path, which keeps
# a quoted local part quoted (the RFC 5322 parser drops quotes it finds needless, and
# `"x..y"@example.com` would come out as the invalid `x..y@example.com`). The domain is
# taken loosely here and checked by `address_problem`.
# (One character class per run: no nested repetition to backtrack through.)
_ATEXT_UTF8 = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]"
_QUOTED_LOCAL = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_DOT_STRING = rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*"
_LOOSE_DOMAIN = r"(?:\[[^\[\]\\\s]*\]|[^\s<>@\[\]\\\"(),;:]+)"
_ROUTE = rf"(?:@{_LOOSE_DOMAIN}(?:,@{_LOOSE_DOMAIN})*:)"
RFC5321_PATH = re.compile(
    rf"[ \t]*<{_ROUTE}?((?:{_DOT_STRING}|{_QUOTED_LOCAL})@{_LOOSE_DOMAIN})>[ \t]*(.*)\Z"
)
# What `address_problem` takes at a glance: a dot-atom at a host name whose labels are
# 63 octets at most (SIMPLE_PATH's address, bounded).
_SIMPLE_ADDRESS = re.compile(
    rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?)*\Z"
)
_DOT_STRING_ONLY = re.compile(rf"{_DOT_STRING}\Z")
_QUOTED_ONLY = re.compile(rf"{_QUOTED_LOCAL}\Z")
# A domain label: letters, digits and hyphens (a U-label, RFC 6531, any letter), with
# no hyphen at either end (checked apart) and 63 octets at most.
_LABEL_TEXT = re.compile(r"(?:[^\W_]|-)+\Z")


def address_problem(address: str) -> str | None:
    """Why `address` (as `_getaddr` returns it, quoted local part kept) is ruled out by
    RFC 5321 §4.1.2, or None: a dot-string local part without leading, trailing or
    doubled dots unless quoted; a domain of letter-digit-hyphen labels (no hyphen at
    either end), or an address literal that is a real IPv4 or `IPv6:` address."""
    if _SIMPLE_ADDRESS.match(address):
        return None
    local, at, domain = address.rpartition("@")
    if not at:
        return "address has no domain"
    if local.startswith('"'):
        if not _QUOTED_ONLY.match(local):
            return "malformed quoted local part"
    elif not _DOT_STRING_ONLY.match(local):
        return "local part must not begin or end with a dot, nor have two in a row"
    if domain.startswith("["):
        return None if address_literal_ok(domain) else "invalid address literal"
    return domain_problem(domain)


def domain_problem(domain: str) -> str | None:
    """Why `domain` is not an RFC 5321 host name (U-labels allowed), or None."""
    if not domain or len(domain.encode()) > 255:
        return "invalid domain"
    for label in domain.split("."):
        if not label:
            return "empty domain label"
        if not _LABEL_TEXT.match(label) or "-" in (label[0], label[-1]):
            return "domain labels are letters, digits and hyphens (not first or last)"
        if len(label.encode()) > 63:
            return "domain label longer than 63 octets"
    return None


def address_literal_ok(literal: str) -> bool:
    """`[1.2.3.4]` or `[IPv6:...]` with a real address in it (RFC 5321 §4.1.3); no
    other tag is registered."""
    if not (literal.startswith("[") and literal.endswith("]")):
        return False
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        return _is_ip(inner[5:], ipaddress.IPv6Address)
    return _is_ip(inner, ipaddress.IPv4Address)


def _is_ip(text: str, kind: type) -> bool:
    if not text or "%" in text or not text.isascii():
        return False
    try:
        kind(text)
    except ValueError:
        return False
    return True


# HELO/EHLO: what a sloppy but real client sends is taken (a bare host name without
# dots, underscores, a trailing dot, an unbracketed IP address), as Postfix does unless
# told to be strict; what cannot be a host name or an address literal is refused.
_HELO_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?\Z")


def helo_problem(hostname: str) -> str | None:
    """Why an EHLO/HELO argument is refused (`501 5.5.4`), or None."""
    if len(hostname) > 255:
        return "host name too long"
    if hostname.startswith("["):
        return None if address_literal_ok(hostname) else "invalid address literal"
    if _HELO_NAME.match(hostname):
        return None
    if ":" in hostname and _is_ip(hostname, ipaddress.IPv6Address):
        return None  # an IPv6 address without its brackets and tag: sloppy, but clear
    return "not a host name or an address literal"


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP, streaming DATA, with enhanced status codes, bounded sessions,
    an error limit and a client limit."""

    # Documented class attribute: the reader's limit (see READ_LIMIT).
    line_length_limit = READ_LIMIT

    def __init__(
        self,
        handler: Any,
        *,
        slots: ClientSlots,
        bare_newlines: str = "normalize",
        error_limit: int = 20,
        proxy_from: tuple[Any, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        if proxy_from is not None:  # every connection starts with a PROXY header
            low, high = PROXY_HEADER_TIMEOUT
            kwargs["proxy_protocol_timeout"] = max(low, min(high, kwargs.get("timeout", high)))
        super().__init__(handler, **kwargs)
        self._proxy_from = proxy_from
        self._slots = slots
        self._bare_newlines = bare_newlines
        self._error_limit = error_limit
        self._errors = 0
        self._holds_slot = False
        self._plain_replies = ""  # reply classes sent without a status code (EHLO, HELP)
        self._deadline = 0.0

    # -- the session's life: one slot, one timer ------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # the TLS layer, after STARTTLS
            super().connection_made(transport)
            return
        if self._proxy_from is not None and not self._from_a_proxy(transport):
            return
        if not self._slots.acquire():
            peer = transport.get_extra_info("peername")
            reply = f"421 4.7.0 {self.hostname} Error: too many connections, try later"
            log.event("rejected", client=client_ip(peer), reply=reply, status="4.7.0")
            transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self._holds_slot = True
        _read_in_small_pieces(transport)
        super().connection_made(transport)
        # The session's task owns the slot: its end, however it comes (even a cancel
        # before it ever ran), gives the slot back.
        assert self._handler_coroutine is not None
        self._handler_coroutine.add_done_callback(self._give_back_slot)
        if self._proxy_from is not None:
            self._handler_coroutine.add_done_callback(self._log_bad_proxy_header)

    def _from_a_proxy(self, transport: asyncio.BaseTransport) -> bool:
        """Only `proxy_from` may speak to a PROXY listener: others are refused at once."""
        assert self._proxy_from is not None
        ip = client_ip(transport.get_extra_info("peername"))
        if in_networks(ip, self._proxy_from):
            return True
        reply = f"554 5.7.1 {self.hostname} Error: connect through the proxy"
        log.event("rejected", client=ip, reply=reply, status="5.7.1", error="not in proxy_from")
        transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()
        return False

    def _log_bad_proxy_header(self, task: object = None) -> None:
        data = self.session.proxy_data if self.session else None
        if data is not None and not data.valid:
            peer = client_ip(self.session.peer) if self.session else None
            log.event("protocol_error", client=peer, error=f"no valid PROXY header: {data.error}")

    def _give_back_slot(self, task: object = None) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self._slots.release()

    def connection_lost(self, error: Exception | None) -> None:
        if self.session is None:
            return  # refused in connection_made: aiosmtpd never set this session up
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Push the session's deadline out. aiosmtpd cancels its timer and makes a new
        one for every command; here one timer lives on and, when it fires early, is
        set again for the deadline (cancelled timers would wait in the loop's heap)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is None or timer.cancelled() or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_deadline)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        """The client was silent for `smtp.timeout`: tell it, and end the session."""
        peer = client_ip(self.session.peer) if self.session else None
        if self._handshaking():
            log.event("tls_failed", client=peer, error="no TLS handshake within the timeout")
        elif self._waiting_for_proxy_header():
            log.event("protocol_error", client=peer, error="no PROXY header within the timeout")
        else:
            log.event("protocol_error", client=peer, error="timeout: the client was silent")
            transport = self.transport
            if transport is not None and not transport.is_closing():
                with contextlib.suppress(Exception):
                    reply = f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"
                    transport.write(reply.encode())  # type: ignore[attr-defined]
        self._end_session()

    def _waiting_for_proxy_header(self) -> bool:
        return self._proxy_from is not None and (
            self.session is None or self.session.proxy_data is None
        )

    def _handshaking(self) -> bool:
        """STARTTLS was answered 220 and the TLS session is not up yet."""
        return self._original_transport is not None and (
            self.session is None or self.session.ssl is None
        )

    def _end_session(self) -> None:
        """Close every layer of the connection and end the session's task. Closing the
        TLS layer alone is not enough during a handshake: asyncio then never tells the
        protocol the connection is gone."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.close()
        original = self._original_transport
        if original is not None and self._handshaking():
            original.abort()  # type: ignore[attr-defined]  # a handshake: no goodbye
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    # -- replies ----------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        limit_reached = False
        if isinstance(status, str):
            status = UNSAFE.sub("?", status)  # never echo a client's CR, NUL, ESC...
            if status[:1] not in self._plain_replies:
                status = with_enhanced_code(status)
            if status[:1] in ("4", "5") and status[3:4] != "-":
                if status[:1] not in self._plain_replies:
                    self._log_rejected(status)
                self._errors += 1
                limit_reached = self._errors >= self._error_limit and not status.startswith("421")
        await super().push(status)
        if limit_reached:
            await self._too_many_errors()

    async def _too_many_errors(self) -> None:
        reply = f"421 4.7.0 {self.hostname} Error: too many errors"
        self._log_rejected(reply)
        await super().push(reply)
        self._end_session()

    def _log_rejected(self, reply: str) -> None:
        peer = self.session.peer if self.session else None
        sender = self.envelope.mail_from if self.envelope else None
        log.event("rejected", client=client_ip(peer), sender=sender, reply=reply, status=reply[4:9])

    async def _without_status_codes(self, coro: Any, classes: str = "2345") -> None:
        self._plain_replies = classes
        try:
            await coro
        finally:
            self._plain_replies = ""

    async def handle_exception(self, error: Exception) -> str:
        """A client's doing (an over-long AUTH line) is a protocol error; anything else
        is the relay's own bug, for the handler to log."""
        if isinstance(error, (ValueError, asyncio.LimitOverrunError)) and "limit" in str(error):
            peer = client_ip(self.session.peer) if self.session else None
            log.event("protocol_error", client=peer, error="line too long")
            return "500 5.5.2 Error: line too long"
        return await super().handle_exception(error)

    # -- commands ---------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser, stricter: `<a@b` and `a@` are malformed (553), not accepted
        or a crash. A plain `<dot-atom@domain>`, nearly every address, skips the RFC 5322
        parser: it gives the same answer at a twentieth of the cost. Any other RFC 5321
        path is taken as written (a quoted local part stays quoted); only what is not
        one (no brackets, comments) goes to the lenient RFC 5322 parser. What RFC 5321
        rules out in an address that parses is for the handler (`address_problem`)."""
        simple = SIMPLE_PATH.match(arg or "")
        if simple and not (
            self.local_part_limit and simple.start(2) - simple.start(1) > self.local_part_limit
        ):
            return simple.group(1), simple.group(3)
        if arg and arg.lstrip().startswith("<") and ">" not in arg:
            return None, None
        if arg and UNSAFE.search(arg):
            # NUL, CR, ESC or bytes that are not UTF-8, anywhere: the RFC 5322 parser
            # would drop them with a comment and take the rest (`<a(\x80x@b>` is `a`).
            return None, None
        strict = RFC5321_PATH.match(arg or "")
        if strict:
            address = strict.group(1)
            local = address.rpartition("@")[0]
            if self.local_part_limit and len(local) > self.local_part_limit:
                return None, None
            return address, strict.group(2)
        try:
            address, rest = super()._getaddr(arg)
        except (IndexError, ValueError):
            return None, None
        if address and any(c.isspace() for c in address):
            return None, None  # "<bad address>": the parser keeps the space
        return address, rest

    # RFC 3461: aiosmtpd upper-cases parameters and refuses unknown ones (555), so the
    # DSN parameters are taken out of the command, case intact, before it parses.

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._with_dsn_params("MAIL", arg, super().smtp_MAIL)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._with_dsn_params("RCPT", arg, super().smtp_RCPT)

    async def _with_dsn_params(self, command: str, arg: str | None, parse: Any) -> None:
        try:
            rest, params = take_dsn_params(command, arg)
        except ValueError as exc:
            await self.push(f"501 5.5.4 Error: {exc}")
            return
        if params and not (self.session and self.session.extended_smtp):
            await self.push("501 5.5.4 Error: DSN parameters need EHLO")
            return
        envelope = self.envelope
        before = (envelope.mail_from, len(envelope.rcpt_tos)) if envelope else None
        await parse(rest)
        if envelope is None or envelope is not self.envelope or before is None:
            return
        if command == "MAIL" and not before[0] and envelope.mail_from:
            envelope.dsn_mail = params  # type: ignore[attr-defined]
        elif command == "RCPT" and len(envelope.rcpt_tos) > before[1]:
            dsn_rcpt = getattr(envelope, "dsn_rcpt", [])
            dsn_rcpt.append(params)
            envelope.dsn_rcpt = dsn_rcpt  # type: ignore[attr-defined]

    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname and UNSAFE.search(hostname):
            await self._without_status_codes(self.push("501 Syntax: EHLO hostname"))
            return
        if hostname and await self._bad_helo(hostname):
            return
        await self._without_status_codes(super().smtp_EHLO(hostname))

    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and UNSAFE.search(hostname):
            await self._without_status_codes(self.push("501 Syntax: HELO hostname"))
            return
        if hostname and await self._bad_helo(hostname):
            return
        await self._without_status_codes(super().smtp_HELO(hostname))

    async def _bad_helo(self, hostname: str) -> bool:
        """Refuse (501 5.5.4) a greeting RFC 5321 rules out; the session goes on, and
        the client's earlier greeting, if any, still stands."""
        problem = helo_problem(hostname)
        if problem is None:
            return False
        await self.push(f"501 5.5.4 Error: invalid HELO/EHLO argument: {problem}")
        return True

    async def smtp_HELP(self, arg: str) -> None:
        await self._without_status_codes(super().smtp_HELP(arg), classes="2")

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, bounded by `smtp.timeout`; once only per session."""
        if self.session is not None and self.session.ssl is not None:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        if arg or not self.tls_context:
            await super().smtp_STARTTLS(arg)
            return
        peer = client_ip(self.session.peer) if self.session else None
        try:
            await asyncio.wait_for(super().smtp_STARTTLS(arg), self._timeout_duration)
        except asyncio.TimeoutError:
            failure = "the client did not complete the TLS handshake in time"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # TLSSetupException: a bad or aborted handshake
            cause = exc.__cause__ or exc
            failure = f"{type(cause).__name__}: {cause}".rstrip(": ")
        else:
            if self.session is not None and self.session.ssl is not None:
                return
            failure = "the connection closed during the TLS handshake"
        log.event("tls_failed", client=peer, error=failure)
        self._end_session()
        raise asyncio.CancelledError  # the session is over; its task ends here

    # AUTH PLAIN as RFC 4616, with the authorization identity checked: acting for
    # someone else is not something this relay grants (SPEC §4). Both mechanisms check
    # the password off the loop.
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            await self.push("535 5.7.8 Error: authorization identity must be the login")
            return AuthResult(success=False, handled=True)
        return await self._check_login("PLAIN", login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._check_login("LOGIN", login, password)

    async def _check_login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        """The password check, in a thread: its hash is slow on purpose, and the loop
        serves every other session meanwhile."""
        credentials = LoginPassword(login, password)
        return await self.loop.run_in_executor(None, self._authenticate, mechanism, credentials)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA streamed into the handler's intake: `begin_message` before the 354 (a
        string refuses), pieces as they arrive, `end_message` for the reply."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        intake = self.event_handler.begin_message(self, self.session, self.envelope)
        if isinstance(intake, str):
            await self.push(intake)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reply = await self._receive(intake)
        self._set_post_data_state()
        await self.push(reply)

    async def _receive(self, intake: Any) -> str:
        """Stream DATA into `intake`; the reply to its end."""
        decoder = DataDecoder(normalize=self._bare_newlines == "normalize")
        limit = self.data_size_limit or 0
        size, refusal = 0, ""

        def refuse(reply: str) -> None:
            nonlocal refusal
            refusal = reply
            intake.discard()  # from now on read and discarded

        def take(piece: bytes) -> Awaitable[None] | None:
            nonlocal size
            data = piece  # counted as it came once the message is refused
            if not refusal:
                try:
                    data = decoder.feed(piece)
                except (BareNewline, LineTooLong) as exc:
                    refuse(_DATA_REFUSALS[type(exc)])
            size += len(data)
            if limit and size > limit and refusal != _TOO_BIG:
                refuse(_TOO_BIG)  # whatever else was wrong: the size is what matters most
            return None if refusal else intake.write(data)

        try:
            await read_data(self._reader, take, self._reset_timeout)
            if not refusal:
                pending = intake.write(decoder.close())
                if pending is not None:
                    await pending
        except BareNewline:
            refuse(_DATA_REFUSALS[BareNewline])
        except BaseException:
            intake.discard()  # the connection ended, or the session was cancelled
            raise
        if refusal:
            return refusal
        return await self.event_handler.end_message(self, self.session, self.envelope, intake)


_TOO_BIG = "552 5.3.4 Error: message exceeds the fixed maximum size"
_DATA_REFUSALS = {
    BareNewline: "554 5.6.0 Error: bare CR or LF in the message (lines must end with CRLF)",
    LineTooLong: f"500 5.5.2 Error: line too long (over {MAX_LINE} octets, RFC 5321 4.5.3.1.6)",
}


# -- listeners ------------------------------------------------------------------------


class Listeners:
    """Every `smtp.listen` address, served by one event loop in one thread."""

    def __init__(
        self,
        factory: Callable[[], RelaySMTP],
        addresses: list[tuple[str, int]],
    ) -> None:
        self._factory = factory
        self._wanted = addresses
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._run, name="smtp", daemon=True)

    def start(self) -> None:
        """Bind every address (a bind error stops them all and is raised), then serve."""
        self._thread.start()
        try:
            for host, port in self._wanted:
                self.servers.append(self._call(self._bind(host, port)))
        except BaseException:
            self.stop()
            raise

    async def _bind(self, host: str, port: int) -> asyncio.base_events.Server:
        try:
            return await self.loop.create_server(
                self._factory, host=host, port=port, reuse_address=True
            )
        except OSError as exc:  # asyncio's message may not name the address
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"smtp.listen {where}: {reason}") from None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro: Any, timeout: float | None = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def ports(self) -> list[int]:
        return [server.sockets[0].getsockname()[1] for server in self.servers]

    @property
    def addresses(self) -> list[str]:
        names = []
        for server in self.servers:
            host, port = server.sockets[0].getsockname()[:2]
            names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return names

    def stop_accepting(self) -> None:
        """Close the listening sockets; sessions already open go on."""
        for server in self.servers:
            self.loop.call_soon_threadsafe(server.close)

    def stop(self) -> None:
        """End every session and the loop's thread."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._close_all(), timeout=5.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()

    async def _close_all(self) -> None:
        for server in self.servers:
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        await self.loop.shutdown_default_executor()  # the password checks' threads


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The context STARTTLS offers clients; raises OSError or ValueError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
