"""The listener's policy: who may relay, limits, the message's headers, and the commit.

The handler of the SMTP server (smtp_server.py speaks the protocol). A message arrives
as a stream (`begin_message`, then `Intake.write` per piece, then `end_message`): its
header block is held, bounded, until it ends, and prepared once (rewriting, the headers
we add, the mail-loop check); the content goes into a spool Draft as it comes, held in
memory while small, written into the spool's tmp/ once large. At the end of DATA the
commit thread makes it durable (commit.py); only then is it answered `250`.
Hooks never do blocking work on the event loop beyond one bounded write.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from . import headers, log
from .auth import FailureBrake, load_users, verify_password
from .commit import GroupCommitter
from .config import Config, ConfigError
from .smtp_server import (
    IDENT,
    ClientSlots,
    Listeners,
    RelaySMTP,
    address_literal_ok,
    address_problem,
    adopt_proxied_client,
    client_ip,
    in_networks,
    server_tls_context,
)
from .spool import Draft, Envelope, Recipient, Spool, SpoolError, new_id
from .submission import Refused, prepare

# The header block is held in memory until the empty line that ends it, up to this
# much; past it, what parses as header fields is the header and the rest is body.
HEADER_MAX = 256 * 1024
# A header block up to this size is prepared on the event loop (well under a
# millisecond); a larger one in a thread.
PREPARE_ON_LOOP = 16 * 1024


class Intake:
    """One message arriving over SMTP: its header block, then its content, into a Draft.

    The header block is prepared once it has ended (or reached HEADER_MAX): on the
    loop when it is small, as nearly all are; in a thread when it is large, so that a
    hostile header (thousands of fields or addresses) holds up no other session:
    `write` then returns an awaitable, and the caller reads no further until it is
    done. `refusal` is set when the message must not be accepted whatever follows (a
    mail loop, a header force_from cannot vouch for); the rest of DATA is then only
    read, by the caller, and discarded.
    """

    def __init__(self, receiver: Receiver, session: Session, envelope: SMTPEnvelope) -> None:
        self._receiver = receiver
        self._session = session
        self._envelope = envelope
        self.queue_id = new_id()
        self.draft: Draft = receiver.spool.draft(self.queue_id)
        self.env: Envelope | None = None  # once the header block is prepared
        self.refusal: str | None = None
        self._head = bytearray()

    def write(self, data: bytes) -> Awaitable[None] | None:
        if self.refusal is not None:
            return None
        if self.env is not None:
            self.draft.write(data)
            return None
        searched = max(len(self._head) - 3, 0)
        self._head += data
        end = header_block_end(self._head, searched)
        if end is not None:
            return self._prepare(end, complete=True)
        if len(self._head) >= HEADER_MAX:
            return self._prepare(self._head.rfind(b"\n") + 1 or len(self._head), complete=False)
        return None

    async def finish(self) -> tuple[Envelope, Draft] | str:
        """(the envelope, the content) to commit, or the reply that refuses the message."""
        if self.env is None and self.refusal is None:
            pending = self._prepare(len(self._head), complete=True)  # no empty line: all header
            if pending is not None:
                await pending
        if self.refusal is not None:
            return self.refusal
        assert self.env is not None
        return replace(self.env, size=self.draft.size, arrival=time.time()), self.draft

    def discard(self) -> None:
        self._head = bytearray()
        self.draft.discard()

    def _prepare(self, end: int, complete: bool) -> Awaitable[None] | None:
        head, self._head = bytes(self._head), bytearray()
        if end <= PREPARE_ON_LOOP:  # the header block; what follows it is body
            self._prepared(head, end, self._prepare_header(head[:end], complete))
            return None
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, self._prepare_header, head[:end], complete)
        return self._prepared_when_done(work, head, end)

    def _prepare_header(
        self, header: bytes, complete: bool
    ) -> tuple[Envelope, list[bytes]] | Refused:
        try:
            return self._receiver.prepare(
                self._session, self._envelope, self.queue_id, header, complete=complete
            )
        except Refused as exc:
            return exc

    async def _prepared_when_done(self, work: Awaitable, head: bytes, end: int) -> None:
        self._prepared(head, end, await work)

    def _prepared(
        self, head: bytes, end: int, result: tuple[Envelope, list[bytes]] | Refused
    ) -> None:
        if isinstance(result, Refused):
            self.refusal = result.reply
            self.draft.discard()
            return
        self.env, chunks = result
        for chunk in chunks:
            self.draft.write(chunk)
        self.draft.write(head[end:])


def header_block_end(head: bytes | bytearray, start: int = 0) -> int | None:
    """Where the header fields of `head` end (before the empty line), or None if the
    empty line has not come yet. Content arrives with CRLF line endings here."""
    if head.startswith(b"\r\n"):
        return 0
    found = head.find(b"\r\n\r\n", start)
    return None if found < 0 else found + 2


class Receiver:
    """The SMTP server's handler: relay permission, limits, headers, the spool commit."""

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

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, proxy_data: Any
    ) -> bool:
        """The proxy (in `smtp.proxy_from`, checked at connect) names the real client."""
        return adopt_proxied_client(session, proxy_data)

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
        for a while without hashing (scrypt is slow on purpose; this runs in a thread)."""
        client = client_ip(session.peer) or "?"
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
        if address != "<>":
            problem = self._address_problem(address, sender=True)
            if problem:
                return f"501 5.1.3 Error: bad sender address syntax: {problem}"
        if not envelope.smtp_utf8 and not address.isascii():
            return "553 5.6.7 Error: a non-ASCII address needs SMTPUTF8 on MAIL"
        # The null sender stays "<>" here: aiosmtpd takes an empty mail_from for "no MAIL".
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str, options: list
    ) -> str:
        if address == "<>":
            return "501 5.1.3 Error: the null address is not a valid recipient"
        problem = self._address_problem(address, sender=False)
        if problem:
            return f"501 5.1.3 Error: bad recipient address syntax: {problem}"
        if not envelope.smtp_utf8 and not address.isascii():
            return "553 5.6.7 Error: a non-ASCII address needs SMTPUTF8 on MAIL"
        if not self.may_relay(session):
            return f"554 5.7.1 <{address}>: Relay access denied"
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    def begin_message(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> Intake | str:
        """At DATA, before the 354: where the message goes, or why it may not come."""
        with self._committing:
            if self._closing:
                return "421 4.3.2 Error: shutting down, try again later"
        return Intake(self, session, envelope)

    async def end_message(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, intake: Intake
    ) -> str:
        """At the end of DATA: commit durably, then 250; or 4xx/5xx, never a false 250."""
        outcome = await intake.finish()
        if isinstance(outcome, str):
            return outcome
        env, draft = outcome
        with self._committing:
            if self._closing:
                draft.discard()
                return "421 4.3.2 Error: shutting down, try again later"
            self._commits += 1
        try:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            self.committer.submit(env, draft, loop, done)
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

    def committed(self, env: Envelope, error: SpoolError | None, seconds: float) -> None:
        """After each commit, in the committer's thread: log it (with the `seconds`
        from the end of DATA to the durable commit) and hand it over."""
        if error is not None:
            log.event("spool_error", level=logging.ERROR, queue_id=env.id, error=str(error))
            return
        log.event(
            "received",
            queue_id=env.id,
            source="smtp",
            client=env.client,
            helo=env.helo,
            auth_user=env.auth_user,
            sender=env.sender,
            recipients=[r.address for r in env.recipients],
            size=env.size,
            message_id=env.message_id,
            commit_seconds=round(seconds, 6),
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

    def _address_problem(self, address: str, sender: bool) -> str | None:
        """What RFC 5321 rules out in an envelope address (see `address_problem`). An
        address without a domain is taken, as Postfix takes it: it gets @hostname
        before it is queued (submission.prepare), so that is the address checked."""
        if "@" not in address:
            address = f"{address}@{self.config.hostname}"
        return address_problem(address)

    def may_relay(self, session: Session) -> bool:
        """Only clients in `smtp.allow`, or authenticated ones, relay. No exceptions."""
        if session.authenticated:
            return True
        return in_networks(client_ip(session.peer), self.config.smtp.allow)

    # -- the message ---------------------------------------------------------

    def prepare(
        self,
        session: Session,
        envelope: SMTPEnvelope,
        queue_id: str,
        header: bytes,
        *,
        complete: bool = True,
    ) -> tuple[Envelope, list[bytes]]:
        """The spool envelope, and the message's start: the headers we add and the
        client's header block, rewritten. Raises submission.Refused."""
        mail_params: dict[str, str] = getattr(envelope, "dsn_mail", {})
        options = [o.upper() for o in envelope.mail_options]
        auth_user = session.auth_data if session.authenticated else None
        submitted = Envelope(
            id=queue_id,
            sender="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            recipients=[
                Recipient(address=a, notify=p.get("NOTIFY"), orcpt=p.get("ORCPT"))
                for a, p in zip(envelope.rcpt_tos, _rcpt_params(envelope))
            ],
            arrival=time.time(),
            client=client_ip(session.peer),
            helo=session.host_name or None,
            auth_user=auth_user if isinstance(auth_user, str) else None,
            source="smtp",
            smtputf8=bool(envelope.smtp_utf8),
            crlf=True,  # DataDecoder saw to it
            body=next((o.split("=", 1)[1] for o in options if o.startswith("BODY=")), None),
            ret=mail_params.get("RET"),
            envid=mail_params.get("ENVID"),
        )
        received = received_header(session, envelope, queue_id, self.config.hostname)
        return prepare(self.config, submitted, received, header, complete=complete)


def _rcpt_params(envelope: SMTPEnvelope) -> list[dict[str, str]]:
    """The DSN parameters of each recipient, in RCPT order."""
    given: list[dict[str, str]] = getattr(envelope, "dsn_rcpt", [])
    return given + [{}] * (len(envelope.rcpt_tos) - len(given))


def received_header(
    session: Session, envelope: SMTPEnvelope, queue_id: str, hostname: str
) -> bytes:
    """`Received:` as Postfix writes it; `for` only with a single recipient (privacy).

    What the client chose is made harmless first: its HELO name as it is only when it
    is an atom or an address literal (else a quoted string, control and non-ASCII
    characters as "?"), the address only when it is one, the recipient only when it
    has nothing that could end the field or the angle brackets early.
    """
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl:
        protocol += "S"
    if session.authenticated:
        protocol += "A"
    helo = _received_token(session.host_name) if session.host_name else "unknown"
    ip = _received_ip(client_ip(session.peer))
    lines = [
        f"Received: from {helo} ([{ip}])",
        f"\tby {hostname} (smarthost) with {protocol} id {queue_id}",
    ]
    if len(envelope.rcpt_tos) == 1 and _RECEIVED_FOR.match(envelope.rcpt_tos[0]):
        lines.append(f"\tfor <{envelope.rcpt_tos[0]}>")
    lines[-1] += f"; {headers.date_now()}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


# An RFC 5322 atom (a host name, with sloppy underscores), or an address literal.
_RECEIVED_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z|\[[A-Za-z0-9:.]+\]\Z")
# An address `for <...>` may show: printable, and without white space outside quotes
# that could not be folded back; nothing that ends a line.
_RECEIVED_FOR = re.compile(
    r'(?:[!#-~\u00a0-\U0010ffff]|"(?:[ !#-\[\]-~\u00a0-\U0010ffff]|\\[ -~])*")+\Z'
)
_UNPRINTABLE = re.compile(r'[^ -~]|["\\]')


def _received_token(text: str) -> str:
    """`text` as one received-token: itself if an atom or an address literal, else a
    quoted string (`\\` and `"` escaped, anything else not printable ASCII as "?")."""
    if _RECEIVED_ATOM.match(text):
        return text
    quoted = _UNPRINTABLE.sub(lambda m: "\\" + m.group() if m.group() in '"\\' else "?", text)
    return f'"{quoted}"'


def _received_ip(ip: str | None) -> str:
    """The client's address as an address literal's inside, or "unknown"."""
    if ip is None:
        return "unknown"
    ip = ip.split("%", 1)[0]  # a link-local address's scope is the relay's business
    inner = ip if ":" not in ip else f"IPv6:{ip}"
    return ip if address_literal_ok(f"[{inner}]") else "unknown"


def start_listeners(
    config: Config, handler: Receiver, slots: ClientSlots | None = None
) -> Listeners:
    """Bind every `smtp.listen` address in one event loop; a bind error stops them all."""
    slots = slots or ClientSlots(config.smtp.max_clients)
    tls = tls_context(config)
    smtp = config.smtp

    def session() -> RelaySMTP:
        return RelaySMTP(
            handler,
            slots=slots,
            bare_newlines=smtp.bare_newlines,
            error_limit=smtp.error_limit,
            proxy_from=smtp.proxy_from if smtp.proxy_protocol else None,
            hostname=config.hostname,
            ident=IDENT,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=smtp.timeout,
            tls_context=tls,
            auth_require_tls=True,
            authenticator=handler.authenticate,
            loop=listeners.loop,
        )

    listeners = Listeners(session, list(smtp.listen))
    listeners.start()
    return listeners


def tls_context(config: Config) -> Any:
    """STARTTLS for clients when `smtp.tls_cert` and `smtp.tls_key` are set."""
    if not (config.smtp.tls_cert and config.smtp.tls_key):
        return None
    try:
        return server_tls_context(config.smtp.tls_cert, config.smtp.tls_key)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"smtp.tls_cert: cannot load the certificate and key: {exc}"]) from None


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
    for load in (tls_context, auth_users):
        try:
            load(config)
        except ConfigError as exc:
            errors += exc.errors
    return errors
