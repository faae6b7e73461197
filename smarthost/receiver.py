"""The SMTP listener: policy checks, then DATA → durable spool commit → 250 or 4xx.

aiosmtpd runs the protocol; this module adds policy in its handler hooks and a small
`SMTP` subclass for what hooks cannot do (enhanced status codes on every reply, the
client limit). Hooks never do blocking work on the event loop: one commit thread
(`GroupCommitter`) makes messages durable, a batch at a time, while other sessions go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session, syntax
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from . import __version__, headers, log
from .auth import FailureBrake, load_users, verify_password
from .config import Config, ConfigError
from .dsn import xtext_decode
from .spool import Envelope, Recipient, Spool, SpoolError, new_id
from .submission import MailLoop, prepare

IDENT = f"ESMTP smarthost {__version__}"
READ_AHEAD = 256 * 1024  # bytes a session may have buffered before its socket pauses


class _QuietDeprecations(logging.Filter):
    """aiosmtpd warns about its own deprecated attribute on every successful login."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_QuietDeprecations())

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
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def with_enhanced_code(reply: str) -> str:
    """Insert the enhanced status code a reply lacks (`552 Too much` → `552 5.3.4 Too much`)."""
    code = reply[:3]
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None or _HAS_ENHANCED.match(reply):
        return reply
    sep, text = reply[3:4] or " ", reply[4:]
    return f"{code}{sep}{enhanced} {text}".rstrip()


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


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# `<local@domain>` with a dot-atom local part and a host name: group 2 is the "@".
_SIMPLE_PATH = re.compile(
    rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*(@){_LABEL}(?:\.{_LABEL})*)>[ \t]*((?:[A-Za-z0-9][ -~]*)?)\Z"
)


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes everywhere and a client limit."""

    def __init__(self, handler: Any, *, slots: ClientSlots, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._slots = slots
        self._holds_slot = False
        self._plain_replies = ""  # reply classes sent without a status code (EHLO, HELP)
        self._deadline = 0.0

    # -- cheaper bookkeeping per command: same behaviour, less work on the loop --------

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

    def data_received(self, data: bytes) -> None:
        # aiosmtpd's reader has the line-length limit, 1001 bytes, as its buffer limit,
        # so more than 2 KB buffered (any message bigger than that) paused the socket
        # and resumed it: two epoll_ctl calls. Lines keep their limit; the socket is
        # paused only past READ_AHEAD.
        reader = self._stream_reader
        limit = getattr(reader, "_limit", None)  # asyncio's own name, 3.9 to 3.13
        if not isinstance(limit, int):
            return super().data_received(data)
        reader._limit = READ_AHEAD // 2  # type: ignore[union-attr]
        try:
            super().data_received(data)
        finally:
            reader._limit = limit  # type: ignore[union-attr]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._holds_slot:
            if not self._slots.acquire():
                peer = transport.get_extra_info("peername")
                reply = f"421 4.7.0 {self.hostname} Error: too many connections, try later"
                log.event("rejected", client=_client_ip(peer), reply=reply, status="4.7.0")
                transport.write(reply.encode() + b"\r\n")
                transport.close()
                return
            self._holds_slot = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._holds_slot:
            return  # refused in connection_made: aiosmtpd never set this session up
        self._holds_slot = False
        self._slots.release()
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _UNSAFE.sub("?", status)  # never echo a client's CR, NUL, ESC...
            if status[:1] not in self._plain_replies:
                status = with_enhanced_code(status)
                if status[:1] in ("4", "5"):
                    self._log_rejected(status)
        await super().push(status)

    def _log_rejected(self, reply: str) -> None:
        peer = self.session.peer if self.session else None
        sender = self.envelope.mail_from if self.envelope else None
        log.event(
            "rejected", client=_client_ip(peer), sender=sender, reply=reply, status=reply[4:9]
        )

    async def _without_status_codes(self, coro: Any, classes: str = "2345") -> None:
        self._plain_replies = classes
        try:
            await coro
        finally:
            self._plain_replies = ""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser, stricter: `<a@b` and `a@` are malformed (553), not accepted
        or a crash. A plain `<dot-atom@domain>`, nearly every address, skips the RFC 5322
        parser: it gives the same answer at a twentieth of the cost."""
        simple = _SIMPLE_PATH.match(arg or "")
        if simple and not (
            self.local_part_limit and simple.start(2) - simple.start(1) > self.local_part_limit
        ):
            return simple.group(1), simple.group(3)
        if arg and arg.lstrip().startswith("<") and ">" not in arg:
            return None, None
        try:
            address, rest = super()._getaddr(arg)
        except (IndexError, ValueError):
            return None, None
        if address and any(c.isspace() for c in address):
            return None, None  # "<bad address>": the parser keeps the space
        if address and _UNSAFE.search(address):
            return None, None  # NUL, CR, ESC or bytes that are not UTF-8
        return address, rest

    # -- RFC 3461: aiosmtpd upper-cases parameters and refuses unknown ones (555), so
    # the DSN parameters are taken out of the command, case intact, before it parses.

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
        if envelope is None or envelope is not self.envelope:
            return
        if command == "MAIL" and not before[0] and envelope.mail_from:
            envelope.dsn_mail = params  # type: ignore[attr-defined]
        elif command == "RCPT" and len(envelope.rcpt_tos) > before[1]:
            dsn_rcpt = getattr(envelope, "dsn_rcpt", [])
            dsn_rcpt.append(params)
            envelope.dsn_rcpt = dsn_rcpt  # type: ignore[attr-defined]

    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname and _UNSAFE.search(hostname):
            await self._without_status_codes(self.push("501 Syntax: EHLO hostname"))
            return
        await self._without_status_codes(super().smtp_EHLO(hostname))

    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and _UNSAFE.search(hostname):
            await self._without_status_codes(self.push("501 Syntax: HELO hostname"))
            return
        await self._without_status_codes(super().smtp_HELO(hostname))

    async def smtp_HELP(self, arg: str) -> None:
        await self._without_status_codes(super().smtp_HELP(arg), classes="2")


_DSN_PARAMS = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}
_COMMAND_ADDRESS = re.compile(r"\s*(?:FROM|TO)\s*:\s*(?:<[^>]*>|\S*)", re.I)
_NOTIFY_KINDS = ("SUCCESS", "FAILURE", "DELAY")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 atext


def take_dsn_params(command: str, arg: str | None) -> tuple[str | None, dict[str, str]]:
    """Split RFC 3461 parameters off a MAIL/RCPT argument, validated and xtext-decoded.

    Returns the argument without them (for aiosmtpd) and {name: value}. Raises
    ValueError with the reply text for a malformed or repeated parameter.
    """
    if not arg:
        return arg, {}
    match = _COMMAND_ADDRESS.match(arg)
    if match is None:
        return arg, {}
    kept, params = [arg[: match.end()]], {}
    for token in arg[match.end() :].split():
        name, _, value = token.partition("=")
        key = name.upper()
        if key not in _DSN_PARAMS[command]:
            kept.append(token)
            continue
        if key in params:
            raise ValueError(f"{key} given twice")
        params[key] = _dsn_value(key, value)
    return " ".join(kept), params


def _dsn_value(key: str, value: str) -> str:
    if key == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            raise ValueError("RET must be FULL or HDRS")
        return value.upper()
    if key == "NOTIFY":
        kinds = value.upper().split(",")
        if kinds != ["NEVER"] and (
            not set(kinds) <= set(_NOTIFY_KINDS) or len(set(kinds)) != len(kinds)
        ):
            raise ValueError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        return ",".join(kinds)
    if key == "ENVID":
        envid = xtext_decode(value)
        if not envid or len(value) > 100:
            raise ValueError("ENVID must be 1 to 100 characters of xtext")
        return envid
    addr_type, sep, address = value.partition(";")  # ORCPT
    if not sep or not _ATOM.fullmatch(addr_type) or not address:
        raise ValueError("ORCPT must be addr-type;xtext, e.g. rfc822;user@example.com")
    return f"{addr_type};{xtext_decode(address)}"


def _probe_bind(host: str, port: int) -> None:
    """Raise the OSError asyncio would meet binding (host, port), at once."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def _client_ip(peer: Any) -> str | None:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


class Listener(Controller):
    """One aiosmtpd Controller per `smtp.listen` address; port 0 binds any free port."""

    def __init__(self, handler: Any, host: str, port: int, slots: ClientSlots, **kwargs: Any):
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._slots = slots

    def start(self) -> None:
        # aiosmtpd reports a bind failure only after its 5 s ready timeout: fail fast.
        if self.port:
            _probe_bind(self.hostname, self.port)
        super().start()

    def stop_accepting(self) -> None:
        """Close the listening socket; sessions already open go on."""
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.close)

    def factory(self) -> SMTP:
        return RelaySMTP(self.handler, slots=self._slots, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        if self.port == 0 and self.server is not None:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()

    @property
    def address(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{host}:{self.port}"


class GroupCommitter:
    """The one thread that makes received mail durable, a batch at a time.

    Messages whose DATA ends while a batch is being written join the next one, and a
    batch shares the spool's syncs (group commit, as databases do: Spool.commit_many).
    One thread, not a pool: fewer threads taking turns on the GIL with the event loop.
    """

    def __init__(
        self, spool: Spool, committed: Callable[[Envelope, SpoolError | None], None]
    ) -> None:
        self.spool = spool
        self.committed = committed
        self._waiting: list[tuple[Envelope, list[bytes], asyncio.AbstractEventLoop, Any]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="commit", daemon=True)
        self._thread.start()

    def submit(
        self,
        env: Envelope,
        content: list[bytes],
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future,
    ) -> None:
        """Commit `env`; `done` (a future of `loop`) then gets None or the SpoolError."""
        with self._wake:
            self._waiting.append((env, content, loop, done))
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Commit what was submitted, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._waiting or self._stopping)
                batch, self._waiting = self._waiting, []
            if not batch:
                return
            self._commit(batch)

    def _commit(self, batch: list) -> None:
        try:
            errors = self.spool.commit_many([(env, content) for env, content, _, _ in batch])
        except Exception as exc:  # a bug: the sessions must still get their 4xx
            log.event("internal_error", level=logging.ERROR, error=repr(exc))
            errors = [SpoolError(errno.EIO, f"commit failed: {exc!r}")] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (env, _, loop, done), error in zip(batch, errors):
            try:
                self.committed(env, error)
            except Exception as exc:  # spooled all the same: the scheduler's rescan finds it
                log.event("internal_error", level=logging.ERROR, error=repr(exc))
            by_loop.setdefault(loop, []).append((done, error))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_settle, outcomes)


def _settle(outcomes: list[tuple[asyncio.Future, SpoolError | None]]) -> None:
    for done, error in outcomes:
        if done.done():
            continue  # the session was cancelled meanwhile: its commit stands
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


class Receiver:
    """aiosmtpd handler: relay permission, limits, headers, and the spool commit."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        on_commit: Callable[[Envelope], None],
    ) -> None:
        self.config = config
        self.spool = spool
        self.on_commit = on_commit
        self.committer = GroupCommitter(spool, self.committed)
        self.users = auth_users(config)
        self.brake = FailureBrake()
        self._commits = 0
        self._closing = False
        self._committing = threading.Condition()

    # -- hooks -------------------------------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, hostname: str, responses: list
    ) -> list:
        session.host_name = hostname
        if not self.users:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        return responses[:-1] + extra + responses[-1:]

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, args: list
    ) -> Any:
        if not self.users:
            return "502 5.5.1 Error: AUTH not available"
        return MISSING  # aiosmtpd runs the mechanism, then `authenticate`

    def authenticate(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, mechanism: str, data: Any
    ) -> AuthResult:
        """Check a login against `smtp.auth_users`; a client that keeps failing is refused
        for a while without hashing (scrypt is slow on purpose; this runs on the loop)."""
        client = _client_ip(session.peer) or "?"
        if self.brake.blocked(client):
            reply = "454 4.7.0 Error: too many failed logins, try again later"
            return AuthResult(success=False, handled=False, message=reply)
        user = bytes(getattr(data, "login", b"") or b"").decode("utf-8", "replace")
        password = bytes(getattr(data, "password", b"") or b"").decode("utf-8", "replace")
        stored = self.users.get(user)
        if stored is not None and verify_password(stored, password):
            return AuthResult(success=True, auth_data=user)
        self.brake.failed(client)
        log.event("auth_failed", level=logging.WARNING, client=client, user=user[:64])
        return AuthResult(success=False, handled=False)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str, options: list
    ) -> str:
        # The null sender stays "<>" here: aiosmtpd takes an empty mail_from for "no MAIL".
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str, options: list
    ) -> str:
        if address == "<>":
            return "501 5.1.3 Error: the null address is not a valid recipient"
        if not self.may_relay(session):
            return f"554 5.7.1 <{address}>: Relay access denied"
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        try:
            env, content = self.build(session, envelope)
        except MailLoop:
            return "554 5.4.6 Error: too many hops, a mail loop"
        with self._committing:
            if self._closing:
                return "421 4.3.2 Error: shutting down, try again later"
            self._commits += 1
        try:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            self.committer.submit(env, content, loop, done)
            await done
        except SpoolError as exc:
            if exc.no_space:
                return "452 4.3.1 Error: insufficient system storage, try again later"
            return "451 4.3.0 Error: local error in processing, try again later"
        finally:
            with self._committing:
                self._commits -= 1
                self._committing.notify_all()
        return f"250 2.0.0 Ok: queued as {env.id}"

    def committed(self, env: Envelope, error: SpoolError | None) -> None:
        """After each commit, in the committer's thread: log it and hand it over."""
        if error is not None:
            log.event("spool_error", level=logging.ERROR, queue_id=env.id, error=str(error))
            return
        log.event(
            "received",
            queue_id=env.id,
            client=env.client,
            helo=env.helo,
            sender=env.sender,
            recipients=[r.address for r in env.recipients],
            size=env.size,
            message_id=env.message_id,
        )
        self.on_commit(env)

    def wait_for_commits(self, timeout: float) -> bool:
        """Refuse new messages, and wait until no session is between DATA and its reply."""
        with self._committing:
            self._closing = True
            return self._committing.wait_for(lambda: self._commits == 0, timeout)

    async def handle_exception(self, error: Exception) -> str:
        """A bug in a hook: log it, and tell the client to retry without internals."""
        log.event("internal_error", level=logging.ERROR, error=repr(error))
        return "451 4.3.0 Error: internal error, try again later"

    # -- policy --------------------------------------------------------------

    def may_relay(self, session: Session) -> bool:
        """Only clients in `smtp.allow`, or authenticated ones, relay. No exceptions."""
        if session.authenticated:
            return True
        ip = _client_ip(session.peer)
        if ip is None:
            return False
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.config.smtp.allow)

    # -- the message ---------------------------------------------------------

    def build(self, session: Session, envelope: SMTPEnvelope) -> tuple[Envelope, list[bytes]]:
        """The spool envelope and the content chunks, with the headers we add."""
        queue_id = new_id()
        mail_params: dict[str, str] = getattr(envelope, "dsn_mail", {})
        options = [o.upper() for o in envelope.mail_options]
        submitted = Envelope(
            id=queue_id,
            sender="" if envelope.mail_from == "<>" else envelope.mail_from,
            recipients=[
                Recipient(address=a, notify=p.get("NOTIFY"), orcpt=p.get("ORCPT"))
                for a, p in zip(envelope.rcpt_tos, _rcpt_params(envelope))
            ],
            arrival=time.time(),
            client=_client_ip(session.peer),
            helo=session.host_name or None,
            source="smtp",
            smtputf8=bool(envelope.smtp_utf8),
            body=next((o.split("=", 1)[1] for o in options if o.startswith("BODY=")), None),
            ret=mail_params.get("RET"),
            envid=mail_params.get("ENVID"),
        )
        received = received_header(session, envelope, queue_id, self.config.hostname)
        return prepare(self.config, submitted, received, envelope.original_content or b"")


def _rcpt_params(envelope: SMTPEnvelope) -> list[dict[str, str]]:
    """The DSN parameters of each recipient, in RCPT order."""
    given: list[dict[str, str]] = getattr(envelope, "dsn_rcpt", [])
    return given + [{}] * (len(envelope.rcpt_tos) - len(given))


def received_header(
    session: Session, envelope: SMTPEnvelope, queue_id: str, hostname: str
) -> bytes:
    """`Received:` as Postfix writes it; `for` only with a single recipient (privacy)."""
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl:
        protocol += "S"
    if session.authenticated:
        protocol += "A"
    helo = session.host_name or "unknown"
    ip = _client_ip(session.peer) or "unknown"
    lines = [
        f"Received: from {helo} ([{ip}])",
        f"\tby {hostname} (smarthost) with {protocol} id {queue_id}",
    ]
    if len(envelope.rcpt_tos) == 1:
        lines.append(f"\tfor <{envelope.rcpt_tos[0]}>")
    lines[-1] += f"; {headers.date_now()}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def start_listeners(
    config: Config, handler: Receiver, slots: ClientSlots | None = None
) -> list[Listener]:
    """Bind every `smtp.listen` address; a bind error stops everything already started."""
    slots = slots or ClientSlots(config.smtp.max_clients)
    tls = server_tls_context(config)
    listeners: list[Listener] = []
    try:
        for host, port in config.smtp.listen:
            listener = Listener(
                handler,
                host,
                port,
                slots,
                server_hostname=config.hostname,
                ident=IDENT,
                data_size_limit=config.smtp.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                timeout=config.smtp.timeout,
                tls_context=tls,
                auth_require_tls=True,
                authenticator=handler.authenticate,
            )
            listener.start()
            listeners.append(listener)
    except BaseException:
        for listener in listeners:
            listener.stop()
        raise
    return listeners


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """STARTTLS for clients when `smtp.tls_cert` and `smtp.tls_key` are set."""
    if not (config.smtp.tls_cert and config.smtp.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.smtp.tls_cert, config.smtp.tls_key)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"smtp.tls_cert: cannot load the certificate and key: {exc}"]) from None
    return context


def auth_users(config: Config) -> dict[str, str]:
    """The `smtp.auth_users` file, read now; a bad one is a configuration error."""
    if not config.smtp.auth_users:
        return {}
    try:
        return load_users(config.smtp.auth_users)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"smtp.auth_users: {exc}"]) from None


def check_listener_files(config: Config) -> list[str]:
    """For `smarthost check`: the TLS certificate and the users file can be read."""
    errors = []
    for load in (server_tls_context, auth_users):
        try:
            load(config)
        except ConfigError as exc:
            errors += exc.errors
    return errors
