"""Outcomes someone must hear about: DSNs queued as new messages, double bounces kept.

A DSN is an ordinary message in the spool (envelope sender `<>`), relayed through the
upstreams like any other. A message whose own sender is `<>` never gets a DSN: when
it fails it is a double bounce, kept in failed/, logged at error level, and copied to
`dsn.postmaster` when set (the copy is marked, so its own failure is not copied again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from . import dsn, log
from .config import Config
from .spool import Envelope, Recipient, Spool, new_id

SOURCE_DSN = "dsn"
SOURCE_DOUBLE_BOUNCE = "double-bounce"


class Bouncer:
    """Turns failures, delays and relays into DSNs, and failed bounces into alerts."""

    def __init__(self, config: Config, spool: Spool, submit: Callable[[Envelope], None]) -> None:
        self.config = config
        self.spool = spool
        self.submit = submit

    def report(
        self,
        env: Envelope,
        action: str,
        recipients: list[Recipient],
        now: float | None = None,
    ) -> str | None:
        """Queue one DSN for `recipients` (those whose NOTIFY asks for it); its queue ID."""
        if not env.sender:
            return None
        wanted = [r for r in recipients if dsn.wants_dsn(r, action)]
        if not wanted:
            return None
        now = time.time() if now is None else now
        will_retry_until = env.arrival + self.config.delivery.retry_for
        return self._queue(
            env,
            action,
            wanted,
            now,
            to=env.sender,
            source=SOURCE_DSN,
            will_retry_until=will_retry_until if action == dsn.DELAYED else None,
        )

    def double_bounce(self, env: Envelope, recipients: list[Recipient]) -> None:
        """A `<>` message failed: never a DSN; log it loudly and tell the postmaster."""
        log.event(
            "double_bounce",
            level=logging.ERROR,
            queue_id=env.id,
            recipients=[r.address for r in recipients],
            reply=recipients[-1].reply,
            status=recipients[-1].status,
            kept_in="failed",
        )
        postmaster = self.config.dsn.postmaster
        if postmaster and env.source != SOURCE_DOUBLE_BOUNCE:
            self._queue(
                replace(env, sender=postmaster),
                dsn.FAILED,
                recipients,
                time.time(),
                to=postmaster,
                source=SOURCE_DOUBLE_BOUNCE,
            )

    def _queue(
        self,
        env: Envelope,
        action: str,
        recipients: list[Recipient],
        now: float,
        *,
        to: str,
        source: str,
        will_retry_until: float | None = None,
    ) -> str:
        """Build the report and commit it durably before anything else happens."""
        original, headers_only = self._original(env)
        notice, content = build_notice(
            self.config,
            env,
            recipients,
            action,
            original,
            to=to,
            source=source,
            now=now,
            headers_only=headers_only,
            will_retry_until=will_retry_until,
        )
        dsn_id = notice.id
        self.spool.commit(notice, [content])
        log.event(
            "dsn_queued",
            queue_id=env.id,
            dsn_queue_id=dsn_id,
            action=action,
            recipients=[r.address for r in recipients],
            status=recipients[-1].status if recipients else None,
            sender=to,
        )
        self.submit(notice)
        return dsn_id

    def _original(self, env: Envelope) -> tuple[bytes, bool | None]:
        """What the DSN returns of the original, and whether it is its headers only
        (None: as its length says). Only the head of a message whose headers alone go
        back is read: a large one is never whole in memory for a DSN."""
        if env.ret == "HDRS" or env.size > self.config.dsn.return_max:
            return self.spool.read_message_head(env.id), True
        # Bounded by return_max, as long as the envelope tells its size right.
        return self.spool.read_message(env.id), None


def build_notice(
    config: Config,
    env: Envelope,
    recipients: list[Recipient],
    action: str,
    original: bytes,
    *,
    to: str,
    source: str,
    now: float,
    headers_only: bool | None = None,
    will_retry_until: float | None = None,
) -> tuple[Envelope, bytes]:
    """A DSN about `env` for `recipients` as a new message to `to`: its envelope (sender
    `<>`) and its content, ready to commit."""
    dsn_id = new_id()
    hostname = config.hostname
    content = dsn.build_dsn(
        env,
        recipients,
        action,
        original,
        reporting_mta=hostname,
        from_address=config.dsn.from_address,
        return_max=config.dsn.return_max,
        now=now,
        dsn_id=dsn_id,
        will_retry_until=will_retry_until,
        headers_only=headers_only,
    )
    notice = Envelope(
        id=dsn_id,
        sender="",
        recipients=[Recipient(address=to)],
        arrival=now,
        size=len(content),
        message_id=f"<{dsn_id}@{hostname}>",
        source=source,
        smtputf8=not to.isascii(),
        body=None if content.isascii() else "8BITMIME",
    )
    return notice, content
