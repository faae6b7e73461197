"""One delivery attempt over smtplib, and the one place SMTP replies are classified.

An attempt walks the message's candidate backends. A backend failure (no
connection, TLS, greeting, EHLO, AUTH, 421, a dropped or timed-out session) moves on
to the next backend at once; anything else is the message's outcome, sorted per
recipient into delivered, deferred and failed (SPEC §5).

The content goes after DATA as the claim read it (small mail), or straight from its
spool file, a block at a time, so that a large message costs a few blocks of memory;
either way dot-stuffed and with CRLF line endings only (`send_content`).
"""

from __future__ import annotations

import enum
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Union, cast

from . import headers, oauth2
from .config import BackendConfig, Config
from .dsn import xtext_encode
from .retry import failover
from .spool import DEFERRED, DELIVERED, FAILED_RCPT, CorruptEnvelope, Envelope, Recipient, Spool
from .upstream import Backend, Session, Upstreams, close_session, quit_session


class Verdict(enum.Enum):
    OK = "ok"
    BACKEND_FAILURE = "backend failure"  # try the next backend
    DEFER_MESSAGE = "defer message"
    DEFER_RECIPIENT = "defer recipient"
    FAIL_MESSAGE = "fail message"
    FAIL_RECIPIENT = "fail recipient"


# Stages of a session, in order; the first four belong to the backend, not the message.
BACKEND_STAGES = frozenset({"connect", "ehlo", "starttls", "auth"})


def classify(stage: str, code: int) -> Verdict:
    """What an upstream reply `code` at `stage` means for the message (SPEC §5)."""
    if not 200 <= code < 600:
        # No reply code at all (smtplib's -1) or one SMTP does not have: the upstream
        # said neither yes nor no, so the message may not be failed for it.
        return Verdict.BACKEND_FAILURE
    if 200 <= code < 400:
        return Verdict.OK
    if code == 421 or stage in BACKEND_STAGES:
        return Verdict.BACKEND_FAILURE
    temporary = 400 <= code < 500
    if stage == "rcpt":
        return Verdict.DEFER_RECIPIENT if temporary else Verdict.FAIL_RECIPIENT
    if stage in ("mail", "data"):
        return Verdict.DEFER_MESSAGE if temporary else Verdict.FAIL_MESSAGE
    # RSET or anything unexpected: not the message's fault.
    return Verdict.BACKEND_FAILURE


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_status(code: int, text: str) -> str:
    """The reply's enhanced status code, or the generic one for its class."""
    match = _ENHANCED.match(text)
    if match:
        return match.group(0)
    return f"{str(code)[:1]}.0.0" if 200 <= code < 600 else "4.0.0"


def format_reply(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {' '.join(text.split())}".strip()


_NOT_ASCII = b"5.6.7 this address cannot be sent to the upstream without SMTPUTF8"
_NO_SMTPUTF8 = b"5.6.7 the upstream does not offer SMTPUTF8, which this message needs"

# What a broken session raises: the network, TLS (ssl errors are OSErrors; a bad TLS
# set-up is a ValueError) and the protocol.
SESSION_ERRORS = (OSError, ValueError, smtplib.SMTPException)


# What DATA sends: the bytes a claim read, or the spool file, read in blocks.
Content = Union[bytes, BinaryIO]
DATA_BLOCK = 65536  # a file's content is read and sent in blocks this big


class ContentUnreadable(Exception):
    """The spooled content could not be read during a transaction: the message's
    problem, never the backend's (so not one of SESSION_ERRORS). `error` is what the
    read raised."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class BackendFailure(Exception):
    """This backend cannot take mail now; the next one should be tried. `backend`: the
    one that failed, once known (a DSN names it as the Remote-MTA of its reply)."""

    def __init__(self, reply: str, status: str = "4.4.1", down_now: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.status = status
        self.backend: Backend | None = None
        self.down_now = down_now  # mark the backend down whatever its max_fails


@dataclass
class Attempt:
    """What one attempt did: per-recipient changes are made on the envelope itself."""

    backend: str | None = None  # the last backend that took a transaction
    delivered: list[Recipient] = field(default_factory=list)
    deferred: list[Recipient] = field(default_factory=list)
    failed: list[Recipient] = field(default_factory=list)
    backend_errors: list[tuple[str, str]] = field(default_factory=list)  # (backend, reply)
    waiting_groups: set[str] = field(default_factory=set)  # every backend was down
    relayed: list[Recipient] = field(default_factory=list)  # NOTIFY=SUCCESS, next hop has no DSN
    rate_wait: float | None = None  # some recipients wait for a rate-limit slot until then
    started: float = field(default_factory=time.time)
    header_utf8: bool | None = None  # the header section is not ASCII (once looked at)

    @property
    def progressed(self) -> bool:
        """Anything but a rate-limit hold: the attempt counts."""
        return bool(self.delivered or self.deferred or self.failed)


class UpstreamWaits:
    """How long the sender threads have waited on their upstreams (connecting, reading
    a reply, sending what a slow reader holds up), summed over the threads.

    The dispatcher reads it to learn whether one more thread would help: a thread
    that waits on its upstream leaves the GIL and the CPU to another, while threads
    that mostly run Python only take turns. `with waits:` around each wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0  # threads waiting now
        self._total = 0.0  # thread-seconds waited up to `_at`
        self._at = time.monotonic()

    def __enter__(self) -> None:
        self._count(1)

    def __exit__(self, *exc_info: object) -> None:
        self._count(-1)

    def _count(self, change: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._total += self._waiting * (now - self._at)
            self._at = now
            self._waiting += change

    def total(self) -> tuple[float, float]:
        """(now on the monotonic clock, thread-seconds waited until now)."""
        with self._lock:
            now = time.monotonic()
            return now, self._total + self._waiting * (now - self._at)


class Sender:
    """Delivers one envelope through the upstreams, updating its recipients' state."""

    def __init__(self, config: Config, spool: Spool, upstreams: Upstreams) -> None:
        self.config = config
        self.spool = spool
        self.upstreams = upstreams
        self.stopping = threading.Event()
        self.waits = UpstreamWaits()

    def reload(self, config: Config, upstreams: Upstreams) -> None:
        """A reloaded config: attempts from now on use these upstreams."""
        self.config, self.upstreams = config, upstreams

    def attempt(self, env: Envelope, content: bytes | None = None) -> Attempt:
        """Carry the message upstream: its content if the claim read it already, else
        streamed from its spool file by each transaction that sends DATA.

        Content that cannot be read raises what the read raised (FileNotFoundError,
        CorruptEnvelope, OSError), as reading it before the attempt did.
        """
        result = Attempt()
        try:
            for group, rcpts in self.upstreams.partition(env).items():
                self._attempt_group(env, group, rcpts, content, result)
        except ContentUnreadable as exc:
            raise exc.error from None
        return result

    def _attempt_group(
        self,
        env: Envelope,
        group: str,
        rcpts: list[Recipient],
        content: bytes | None,
        result: Attempt,
    ) -> None:
        """Carry one group's recipients, failing over from backend to backend."""
        tried: set[str] = set()
        errors: list[BackendFailure] = []
        wait_until = None
        try:
            for attempt in failover(self.upstreams.size(group), self.stopping, BackendFailure):
                with attempt:
                    choice = self.upstreams.choose(group, tried, env.id, time.time())
                    if choice.backend is None:
                        wait_until = choice.wait_until
                        break
                    tried.add(choice.backend.name)
                    self._deliver_via(choice.backend, env, rcpts, content, result, errors)
                    return
        except BackendFailure:
            pass  # every backend tried, or stopping: the recipients wait
        if wait_until is not None:
            result.rate_wait = min(result.rate_wait or wait_until, wait_until)
            return
        failed_backend = None
        if errors:
            reply, status = errors[-1].reply, errors[-1].status
            # An upstream's own reply (a 421, a refused AUTH) names that upstream.
            failed_backend = errors[-1].backend if _is_smtp_reply(reply) else None
        else:
            reply, status = f"no backend of group {group!r} is available", "4.4.1"
        for rcpt in rcpts:
            if rcpt.unfinished:
                if _is_smtp_reply(rcpt.reply) and not _is_smtp_reply(reply):
                    # Keep the last word an upstream said, and who said it: it is what
                    # a DSN must quote.
                    said_by = rcpt.remote_mta
                    _record(rcpt, DEFERRED, rcpt.reply or reply, status, None, result)
                    rcpt.remote_mta = said_by
                else:
                    _record(rcpt, DEFERRED, reply, status, failed_backend, result)
        result.waiting_groups.add(group)

    def _deliver_via(
        self,
        backend: Backend,
        env: Envelope,
        rcpts: list[Recipient],
        content: bytes | None,
        result: Attempt,
        errors: list[BackendFailure],
    ) -> None:
        try:
            self._session_transaction(backend, env, rcpts, content, result)
        except BackendFailure as exc:
            exc.backend = exc.backend or backend
            result.backend_errors.append((backend.name, exc.reply))
            errors.append(exc)
            self.upstreams.failed(backend, exc.reply, time.time(), exc.down_now)
            raise
        result.backend = backend.name
        self.upstreams.succeeded(backend)

    def _session_transaction(
        self,
        backend: Backend,
        env: Envelope,
        rcpts: list[Recipient],
        content: bytes | None,
        result: Attempt,
    ) -> None:
        for _ in range(3):
            session = None
            try:
                with backend.session(self.connect) as session:
                    pending = [r for r in rcpts if r.unfinished]
                    self._transaction(session, backend, env, pending, content, result)
                return
            except smtplib.SMTPServerDisconnected as exc:
                # An idle session the server has since closed is no fault of the backend.
                if session is None or not session.reused or session.used_now:
                    raise BackendFailure(_describe(exc)) from exc
                # Its siblings are likely as dead (an upstream restart): a fresh one next.
                backend.close_all()
            except SESSION_ERRORS as exc:
                raise BackendFailure(_describe(exc)) from exc
        raise BackendFailure("connection lost on every reused session")

    def _transaction(
        self,
        session: Session,
        backend: Backend,
        env: Envelope,
        rcpts: list[Recipient],
        content: bytes | None,
        result: Attempt,
    ) -> None:
        smtp = session.smtp
        session.used_now = False
        if not session.clean:
            with self.waits:
                _expect_ok("rset", *smtp.rset())
        # SMTPUTF8 only for what needs it (RFC 6531 §3.4), decided afresh for each
        # transaction: nothing of the last one on this session carries over.
        utf8, refused = self._smtputf8(smtp, env, rcpts, content, result)

        def refuse(rcpts: list[Recipient], reply: bytes = _NOT_ASCII) -> None:
            # The message's problem, not the backend's (never a reason to mark it
            # down), and the relay's own refusal, not the upstream's (RFC 6531 §3.2).
            for rcpt in rcpts:
                self._record_one(rcpt, Verdict.FAIL_RECIPIENT, 553, reply, backend, result, True)

        if refused:
            if len(refused) == len(rcpts):
                refuse(rcpts, _NO_SMTPUTF8)
                return
            rcpts = [r for r in rcpts if all(r is not x for x in refused)]
            refuse(refused)
        try:
            mail = mail_command(smtp, env.sender, self._mail_options(smtp, env, utf8))
        except UnicodeEncodeError:
            refuse(rcpts)
            return
        sendable = []
        for rcpt in rcpts:
            try:
                options = _rcpt_options(smtp, rcpt)
                sendable.append((rcpt, rcpt_command(smtp, rcpt.address, options, utf8)))
            except UnicodeEncodeError:
                refuse([rcpt])
        if not sendable:
            return  # nothing was sent: the session is as clean as it was
        session.clean = False
        # Opened before DATA is sent, so a missing or corrupt file stops the transaction
        # before the upstream waits for content; closed when it ends.
        with self._content(env, content) as body:
            self._exchange(session, backend, mail, sendable, body, env.crlf, result)

    def _exchange(
        self,
        session: Session,
        backend: Backend,
        mail: bytes,
        sendable: list[tuple[Recipient, bytes]],
        content: Content,
        crlf: bool,
        result: Attempt,
    ) -> None:
        """MAIL, RCPT and DATA (pipelined when offered), then the content (`crlf`: its
        lines are known to end with CRLF)."""
        smtp = session.smtp
        commands = [mail, *(command for _, command in sendable), b"DATA\r\n"]
        exchange = Exchange(smtp, commands, self.waits)
        code, msg = exchange.reply()
        session.used_now = True
        outcome = classify("mail", code)
        if outcome is Verdict.BACKEND_FAILURE:
            raise BackendFailure(format_reply(code, msg))
        if outcome is not Verdict.OK:
            self._record_all([r for r, _ in sendable], outcome, code, msg, backend, result)
            exchange.finish()
            return
        accepted = []
        for rcpt, _ in sendable:
            code, msg = exchange.reply()
            outcome = classify("rcpt", code)
            if outcome is Verdict.BACKEND_FAILURE:
                raise BackendFailure(format_reply(code, msg))
            if outcome is Verdict.OK:
                accepted.append(rcpt)
            else:
                self._record_one(rcpt, outcome, code, msg, backend, result)
        if not accepted:
            exchange.finish()
            return
        code, msg = exchange.reply()
        data_refused = code != 354
        if data_refused:  # the DATA command itself was refused
            if 200 <= code < 400:
                # Anything but 354 is no go-ahead: the content was never sent, so a
                # 2xx here must not count as a delivery.
                raise BackendFailure(f"DATA answered {format_reply(code, msg)}, not 354")
        else:
            code, msg = send_content(smtp, content, crlf, self.waits)
        outcome = classify("data", code)
        if outcome is Verdict.BACKEND_FAILURE:
            raise BackendFailure(format_reply(code, msg))
        # Refused before 354, the transaction is still open upstream: RSET before reuse.
        session.clean = not data_refused
        for rcpt in accepted:
            self._record_one(rcpt, outcome, code, msg, backend, result)
        if outcome is Verdict.OK and not smtp.has_extn("dsn"):
            # Asked for success notices, but the next hop cannot send them: we report
            # "relayed" ourselves (RFC 3461 §6.2).
            result.relayed.extend(r for r in accepted if "SUCCESS" in (r.notify or ""))

    @contextmanager
    def _content(self, env: Envelope, content: bytes | None) -> Iterator[Content]:
        """The bytes the claim read, or the spool file, open for one transaction."""
        if content is not None:
            yield content
            return
        try:
            file = self.spool.open_message(env.id, env.size)
        except (CorruptEnvelope, OSError) as exc:
            raise ContentUnreadable(exc) from exc
        with file:
            yield file

    def _smtputf8(
        self,
        smtp: smtplib.SMTP,
        env: Envelope,
        rcpts: list[Recipient],
        content: bytes | None,
        result: Attempt,
    ) -> tuple[bool, list[Recipient]]:
        """(whether MAIL says SMTPUTF8, the recipients this upstream cannot take).

        A transaction needs SMTPUTF8 when an address in it is not ASCII, or when the
        client asked for it and the header section is not ASCII: a client that did
        not ask promised none (RFC 6531 §3.1), and the header is read only for mail
        whose client asked and whose addresses are ASCII. Without SMTPUTF8 upstream,
        the ASCII recipients of a message whose sender and header are ASCII still go.
        """
        sender_ascii = env.sender.isascii()
        others = [r for r in rcpts if not r.address.isascii()]
        if smtp.has_extn("smtputf8"):
            if others or not sender_ascii:
                return True, []
            return self._header_utf8(env, content, result), []
        if not sender_ascii or self._header_utf8(env, content, result):
            return False, list(rcpts)
        return False, others

    def _header_utf8(self, env: Envelope, content: bytes | None, result: Attempt) -> bool:
        """The client asked for SMTPUTF8 and the header section is not ASCII; looked
        at once per attempt."""
        if not env.smtputf8:
            return False
        if result.header_utf8 is None:
            if content is not None:
                head = content[: headers.section_end(content)]
            else:
                try:
                    head = self.spool.read_message_head(env.id)
                except (CorruptEnvelope, OSError) as exc:
                    raise ContentUnreadable(exc) from exc
            result.header_utf8 = not head.isascii()
        return result.header_utf8

    def _mail_options(self, smtp: smtplib.SMTP, env: Envelope, utf8: bool) -> list[str]:
        options = []
        if smtp.has_extn("size"):
            # The spooled size: the content itself may not be in memory.
            options.append(f"SIZE={env.size}")
        if env.body and smtp.has_extn("8bitmime"):
            options.append(f"BODY={env.body}")
        if utf8:
            options.append("SMTPUTF8")
        if smtp.has_extn("dsn"):
            if env.ret:
                options.append(f"RET={env.ret}")
            if env.envid:
                options.append(f"ENVID={xtext_encode(env.envid)}")
        return options

    def _record_all(self, rcpts, outcome, code, msg, backend, result, own=False) -> None:
        per_rcpt = (
            Verdict.DEFER_RECIPIENT if outcome is Verdict.DEFER_MESSAGE else Verdict.FAIL_RECIPIENT
        )
        for rcpt in rcpts:
            self._record_one(rcpt, per_rcpt, code, msg, backend, result, own)

    def _record_one(self, rcpt, outcome, code, msg, backend, result, own=False) -> None:
        """`own`: the relay's own reply, not `backend`'s (it only names the backend the
        attempt was on)."""
        reply = format_reply(code, msg)
        state = {
            Verdict.OK: DELIVERED,
            Verdict.DEFER_RECIPIENT: DEFERRED,
            Verdict.DEFER_MESSAGE: DEFERRED,
            Verdict.FAIL_RECIPIENT: FAILED_RCPT,
            Verdict.FAIL_MESSAGE: FAILED_RCPT,
        }[outcome]
        _record(rcpt, state, reply, enhanced_status(code, reply[4:]), backend, result, own)

    # -- opening a session --------------------------------------------------

    def probe(self, backend: Backend) -> str | None:
        """Open a session to `backend` and say NOOP: None if it answered, else what
        went wrong (for `Prober`)."""
        try:
            # Its own count: a probe's waits are no sender thread's (see UpstreamWaits).
            with backend.session(lambda b: self.connect(b, waits=UpstreamWaits())) as session:
                code, msg = session.smtp.noop()
                if code != 250:
                    raise BackendFailure(format_reply(code, msg))
        except (BackendFailure, *SESSION_ERRORS) as exc:
            return describe_failure(exc)
        return None

    def connect(
        self, upstream: Backend, trace: Trace | None = None, waits: UpstreamWaits | None = None
    ) -> smtplib.SMTP:
        """Connect, greet, encrypt and authenticate as the backend's config asks.

        `trace(stage, detail)` hears each step, for `smarthost check --connect`; the
        time it takes counts in `waits` (the sender threads' by default).
        """
        note = trace or _no_trace
        delivery, backend = self.config.delivery, upstream.config
        if backend.tls == "implicit":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                local_hostname=self.config.hostname,
                timeout=delivery.connect_timeout,
                context=upstream.tls_context,
            )
        else:
            smtp = smtplib.SMTP(
                local_hostname=self.config.hostname, timeout=delivery.connect_timeout
            )
        # smtplib names the TLS server (SNI, host name check) after `_host`, which only
        # its constructor sets; connecting here instead keeps the greeting for the trace.
        smtp._host = backend.host  # type: ignore[attr-defined]
        try:
            with self.waits if waits is None else waits:  # waiting on the upstream, mostly
                code, msg = smtp.connect(backend.host, backend.port)
                note("connect", f"{_peer(smtp)}, greeting {format_reply(code, msg)}")
                if code != 220:
                    raise BackendFailure(format_reply(code, msg))
                if smtp.sock is not None:
                    smtp.sock.settimeout(delivery.timeout)
                if backend.tls == "implicit":
                    note("tls", describe_tls(smtp, backend))
                _expect_ok("ehlo", *smtp.ehlo())
                if backend.tls == "starttls":
                    if not smtp.has_extn("starttls"):
                        raise BackendFailure(
                            f"{backend.name} does not offer STARTTLS, which is required"
                        )
                    _expect_ok("starttls", *smtp.starttls(context=upstream.tls_context))
                    note("tls", describe_tls(smtp, backend))
                    _expect_ok("ehlo", *smtp.ehlo())
                note(
                    "ehlo",
                    " ".join(f"{k.upper()} {v}".strip() for k, v in smtp.esmtp_features.items()),
                )
                if backend.username:
                    mechanism = self._login(smtp, backend, note)
                    note("auth", f"{mechanism} as {backend.username}: accepted")
        except UnicodeEncodeError:
            close_session(smtp)
            # Never the text: it would show part of the secret.
            raise BackendFailure(
                f"{backend.name}: the hostname, user name or secret is not ASCII"
            ) from None
        except BaseException:
            close_session(smtp)
            raise
        return smtp

    def _login(self, smtp: smtplib.SMTP, backend: BackendConfig, note: Trace) -> str:
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mechanism = choose_mechanism(backend.auth, offered)
        if mechanism is None:
            raise BackendFailure(
                f"{backend.name} offers no usable AUTH mechanism "
                f"(auth = {backend.auth!r}; offered: {' '.join(offered) or 'none'})"
            )

        def login(secret: str) -> None:
            if mechanism in ("XOAUTH2", "OAUTHBEARER"):
                response = oauth2.sasl_response(
                    mechanism, backend.username or "", secret, backend.host, backend.port
                )
                # On failure the server sends an error challenge: answer as the
                # mechanism says, and its failure reply follows.
                error_reply = oauth2.sasl_error_reply(mechanism)
                authobject = lambda challenge=None: error_reply if challenge else response  # noqa: E731
            else:
                smtp.user, smtp.password = backend.username or "", secret
                authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
            try:
                smtp.auth(mechanism, authobject)
            finally:
                smtp.password = ""

        try:
            if backend.oauth2 is not None:
                oauth2.authenticate(backend, login, note)
            else:
                login(read_secret(backend))
        except smtplib.SMTPAuthenticationError as exc:
            # Only the server's reply: never the credentials.
            reply = format_reply(exc.smtp_code, exc.smtp_error)
            if backend.oauth2 is not None:
                reply = f"{reply} ({oauth2.REFUSED_TOKEN_HINT})"
            raise BackendFailure(reply, "4.7.8") from None
        except oauth2.TokenError as exc:
            raise token_failure(backend, exc) from None
        return mechanism


Trace = Callable[[str, str], None]


def _no_trace(stage: str, detail: str) -> None:
    pass


def _peer(smtp: smtplib.SMTP) -> str:
    try:
        return str(smtp.sock.getpeername()[0]) if smtp.sock else "?"
    except OSError:
        return "?"


def describe_tls(smtp: smtplib.SMTP, backend: BackendConfig) -> str:
    """Protocol, cipher, certificate subject and whether it was verified."""
    sock = smtp.sock
    if not isinstance(sock, ssl.SSLSocket):
        return "not encrypted"
    cipher = sock.cipher()
    text = f"{sock.version()} {cipher[0] if cipher else ''}".strip()
    if not backend.tls_verify:
        return f"{text}, certificate NOT verified (tls_verify = false)"
    cert = sock.getpeercert() or {}
    subject = _dn_text(cert.get("subject", ()))
    issuer = _dn_text(cert.get("issuer", ()))
    return f"{text}, certificate {subject or '?'} (issuer {issuer or '?'}), verified"


# A certificate's subject or issuer as getpeercert() gives it: a tuple of RDNs, each a
# tuple of (name, value) pairs. typeshed types every field of that dict alike, as
# str | tuple, hence the cast in _dn_text.
_DistinguishedName = tuple[tuple[tuple[str, str], ...], ...]


def _dn_text(value: object) -> str:
    rdns = cast(_DistinguishedName, value)
    return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn)


def check_connections(config: Config, out: Callable[[str], None]) -> bool:
    """`smarthost check --connect`: open a session to every backend and report each
    step; True when every backend accepted a session."""
    upstreams = Upstreams(config)
    sender = Sender(config, Spool(config.spool.dir), upstreams)
    all_ok = True
    for index, backend in enumerate(upstreams.backends):
        cfg = backend.config
        out(f"backend[{index}] {cfg.name} {cfg.host}:{cfg.port} tls={cfg.tls} group={cfg.group}")
        started = time.monotonic()
        try:
            smtp = sender.connect(backend, lambda stage, detail: out(f"  {stage:<8} {detail}"))
        except (BackendFailure, *SESSION_ERRORS) as exc:
            reply = describe_failure(exc)
            out(f"  FAILED   {reply} ({_elapsed(started)})")
            all_ok = False
            continue
        quit_session(smtp)
        out(f"  ok       session ready in {_elapsed(started)}")
    return all_ok


def _elapsed(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.0f} ms"


def token_failure(backend: BackendConfig, exc: oauth2.TokenError) -> BackendFailure:
    """No access token for the backend: a failure of the backend (the mail waits, it
    is never bounced for the relay's own credentials), down at once when refused."""
    assert backend.oauth2 is not None
    fix = oauth2.hint(exc, backend.oauth2, backend.name)
    return BackendFailure(
        f"{backend.name}: OAuth 2.0 token endpoint: {exc}" + (f" ({fix})" if fix else ""),
        "4.7.0",
        down_now=exc.refused,
    )


def choose_mechanism(configured: str, offered: list[str]) -> str | None:
    """The SASL mechanism to use: `auto` is the best of PLAIN and LOGIN offered."""
    wanted = ["PLAIN", "LOGIN"] if configured == "auto" else [configured.upper()]
    return next((m for m in wanted if m in offered), None)


def read_secret(backend: BackendConfig) -> str:
    """The backend's secret, read fresh at each login (files rotate, tokens expire)."""
    if backend.password_command:
        return _run_password_command(backend)
    if backend.password_file:
        with open(backend.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return backend.password or ""


def _run_password_command(backend: BackendConfig) -> str:
    try:
        done = subprocess.run(
            backend.password_command or "",
            shell=True,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackendFailure(f"{backend.name}: password_command timed out") from None
    if done.returncode != 0:
        # Its output may be half a secret: report the status only.
        raise BackendFailure(f"{backend.name}: password_command exited {done.returncode}")
    return done.stdout.splitlines()[0] if done.stdout else ""


def _expect_ok(stage: str, code: int, msg: bytes) -> None:
    if classify(stage, code) is not Verdict.OK:
        raise BackendFailure(format_reply(code, msg))


def _rcpt_options(smtp: smtplib.SMTP, rcpt: Recipient) -> list[str]:
    """NOTIFY and ORCPT pass through to a backend that speaks DSN."""
    if not smtp.has_extn("dsn"):
        return []
    options = [f"NOTIFY={rcpt.notify}"] if rcpt.notify else []
    if rcpt.orcpt:
        addr_type, _, address = rcpt.orcpt.partition(";")
        options.append(f"ORCPT={addr_type};{xtext_encode(address)}")
    return options


def _record(
    rcpt: Recipient,
    state: str,
    reply: str,
    status: str,
    backend: Backend | None,
    result: Attempt,
    own: bool = False,
) -> None:
    """Record a recipient's outcome. `backend`: the upstream the outcome came from,
    whose host a DSN names as the Remote-MTA of `reply`; but `own`: the relay itself
    decided (`reply` is its own), so no Remote-MTA, never the relay's own words put
    in an upstream's mouth."""
    rcpt.state, rcpt.reply, rcpt.status = state, reply, status
    rcpt.backend = backend.name if backend else None
    rcpt.remote_mta = backend.config.host if backend and not own else None
    rcpt.updated = time.time()
    # A recipient deferred by one backend may be delivered by the next in one attempt.
    for recorded in (result.delivered, result.deferred, result.failed):
        recorded[:] = [r for r in recorded if r is not rcpt]
    outcomes: dict[str, list[Recipient]] = {
        DELIVERED: result.delivered,
        DEFERRED: result.deferred,
        FAILED_RCPT: result.failed,
    }
    outcomes[state].append(rcpt)


def _is_smtp_reply(text: str | None) -> bool:
    return text is not None and text[:3].isdigit()


def describe_failure(exc: BaseException) -> str:
    """One line for the log: a backend's reply, or what broke the session."""
    return exc.reply if isinstance(exc, BackendFailure) else _describe(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return format_reply(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"connection lost: {exc}" if str(exc) else "connection lost"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


# -- the transaction's commands --------------------------------------------------------
# smtplib's mail(), rcpt() and data(), with the costly parts done cheaply: quoteaddr()
# runs the RFC 2822 parser on every address, data() a regular expression over the whole
# message. Same bytes on the wire.

_SIMPLE_ADDRESS = re.compile(r"[!#-'*+/-9=?A-Z^-~.-]+@[A-Za-z0-9.-]+\Z")


def _path(address: str) -> str:
    if _SIMPLE_ADDRESS.match(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


class Exchange:
    """The commands of one transaction, and their replies in order.

    With PIPELINING (RFC 2920) offered, MAIL, every RCPT and DATA go in one write, as
    Postfix's client sends them, and the replies are read one by one; otherwise each
    command is sent when its reply is asked for, in lock step.
    """

    def __init__(self, smtp: smtplib.SMTP, commands: list[bytes], waits: UpstreamWaits) -> None:
        self.smtp = smtp
        self.commands = commands
        self.waits = waits
        self.pipelined = smtp.has_extn("pipelining")
        self.answered = 0
        if self.pipelined:
            smtp.send(b"".join(commands))

    def reply(self) -> tuple[int, bytes]:
        """The reply to the next command (sending it first, in lock step)."""
        if not self.pipelined:
            self.smtp.send(self.commands[self.answered])
        elif _QUICKACK is not None and self.smtp.sock is not None:
            # A server that writes each reply on its own with Nagle on holds the next
            # one until our ACK, which the kernel delays 40 ms while we send nothing:
            # ACK at once while replies are owed (the flag lasts until the next read).
            self.smtp.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        self.answered += 1
        with self.waits:
            return self.smtp.getreply()

    def finish(self) -> None:
        """Read the replies still owed for what was sent; a DATA the server took with
        no recipient (it should not) is ended with a lone dot (RFC 2920 §3.1)."""
        if not self.pipelined:
            return
        code = 0
        while self.answered < len(self.commands):
            code, _ = self.reply()
        if code == 354:
            self.smtp.send(b".\r\n")
            with self.waits:
                self.smtp.getreply()


def _command(text: str, utf8: bool) -> bytes:
    """A command line as smtplib's putcmd would send it: UTF-8 only in a transaction
    whose MAIL said SMTPUTF8, else ASCII (a UnicodeEncodeError for anything else).

    The encoding is the transaction's, never the session's: smtplib's `mail()` sets
    `command_encoding` for the session and never sets it back, so the next message on
    a reused session would go out in UTF-8 without SMTPUTF8.
    """
    if "\r" in text or "\n" in text:
        raise ValueError(f"command contains a line break: {text!r}")
    return f"{text}\r\n".encode("utf-8" if utf8 else "ascii")


def mail_command(smtp: smtplib.SMTP, sender: str, options: list[str]) -> bytes:
    """MAIL FROM, as `smtp.mail(sender, options)` words it (UTF-8 with SMTPUTF8)."""
    optionlist, utf8 = "", False
    if options and smtp.does_esmtp:
        if any(option.lower() == "smtputf8" for option in options):
            if not smtp.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError("SMTPUTF8 not supported by server")
            utf8 = True
        optionlist = " " + " ".join(options)
    return _command(f"mail FROM:{_path(sender)}{optionlist}", utf8)


def rcpt_command(
    smtp: smtplib.SMTP, recipient: str, options: list[str], utf8: bool = False
) -> bytes:
    """RCPT TO, as `smtp.rcpt(recipient, options)` words it; `utf8`: its MAIL said
    SMTPUTF8."""
    optionlist = " " + " ".join(options) if options and smtp.does_esmtp else ""
    return _command(f"rcpt TO:{_path(recipient)}{optionlist}", utf8)


def send_content(
    smtp: smtplib.SMTP, content: Content, crlf: bool, waits: UpstreamWaits
) -> tuple[int, bytes]:
    """After 354: the content, dot-stuffed and with CRLF line endings only, then the
    final dot, as `smtp.data` sends a message whose line endings it fixed.

    Bytes (small mail) go in one write with the dot; a file is read and sent a block
    at a time, so a large message costs a few blocks of memory. The dot always goes
    in the same write as the end of the content: a separate small write would wait
    for the delayed ACK of the one before. `crlf`: the content is known to end every
    line with CRLF (the receiver made it so), which saves looking for bare ones.
    """
    data = DataStream(crlf)
    if isinstance(content, bytes):
        wire = data.feed(content) + data.end()
        with waits:
            smtp.send(wire)
    else:
        _send_blocks(smtp, content, data, waits)
    with waits:
        return smtp.getreply()


def _send_blocks(
    smtp: smtplib.SMTP, file: BinaryIO, data: DataStream, waits: UpstreamWaits
) -> None:
    block = _read_block(file)
    while True:
        # One block ahead, to know which is the last: the dot goes with it.
        following = _read_block(file) if block else b""
        if not following:
            wire = data.feed(block) + data.end()
            with waits:
                smtp.send(wire)
            return
        wire = data.feed(block)
        if wire:
            with waits:
                smtp.send(wire)
        block = following


def _read_block(file: BinaryIO) -> bytes:
    try:
        return file.read(DATA_BLOCK)
    except OSError as exc:  # the disk's fault, not the session's
        raise ContentUnreadable(exc) from exc


class DataStream:
    """Content, given in pieces, as it goes after DATA (RFC 5321 §4.5.2): a line that
    starts with "." gets another, and every line ends in CRLF, for a bare LF or bare
    CR may end DATA early at a later hop (SMTP smuggling). A line that starts at the
    edge of a piece and a CR that ends one (CRLF, or bare?) are carried over."""

    def __init__(self, crlf: bool = False) -> None:
        self.crlf = crlf  # every line is known to end with CRLF
        self.line_start = True  # the next byte starts a line
        self.held_cr = False  # the last piece ended with CR: the next byte says what it is
        self.sent = False  # anything went out

    def feed(self, piece: bytes) -> bytes:
        """What goes on the wire for `piece`, the next part of the content."""
        if self.held_cr:
            piece = b"\r" + piece
            self.held_cr = False
        if piece.endswith(b"\r"):
            piece, self.held_cr = piece[:-1], True
        return self._stuff(piece)

    def end(self) -> bytes:
        """The rest after the last piece: a held CR, a last line ending, the dot."""
        tail = self._stuff(b"\r") if self.held_cr else b""  # a bare CR: a line ending
        if not (self.sent and self.line_start):
            tail += b"\r\n"  # as smtplib does, also for empty content
        return tail + b".\r\n"

    def _stuff(self, piece: bytes) -> bytes:
        if not piece:
            return piece
        stuffed = (piece if self.crlf else _crlf(piece)).replace(b"\n.", b"\n..")
        if self.line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self.line_start = stuffed.endswith(b"\n")  # only ever the end of a CRLF
        self.sent = True
        return stuffed


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _crlf(piece: bytes) -> bytes:
    """`piece` with every bare CR and bare LF made CRLF. Three C-level counts tell
    that there is none, as in nearly all mail: no per-line work then."""
    crlf = piece.count(b"\r\n")
    if piece.count(b"\n") == crlf and piece.count(b"\r") == crlf:
        return piece
    return _LINE_END.sub(b"\r\n", piece)
