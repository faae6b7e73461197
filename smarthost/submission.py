"""What every new message goes through before the spool, whichever door it came in by
(SMTP or the drop area): rewriting, the headers we add, and its envelope."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from . import headers, log
from .config import Config
from .rewrite import HeaderInDoubt, rewrite
from .spool import Envelope, Recipient


def scan_headers(
    content: bytes, found: list[headers.Field] | None = None
) -> tuple[bool, str | None]:
    """(has a Date field, the Message-ID field's value or "" if empty, or None if absent),
    from the header section only (`found`: its fields, if already parsed)."""
    if found is None:
        found = headers.read(content).fields
    message_ids = [f.text for f in found if f.name == "message-id"]
    return any(f.name == "date" for f in found), message_ids[0] if message_ids else None


MAX_HOPS = 50  # Received: fields beyond this mean a loop (Postfix's hopcount_limit)


class Refused(ValueError):
    """The relay will not take this message, whichever door it came by: `reply` is the
    SMTP answer at the end of DATA, `exit_code` smarthost-sendmail's (sysexits)."""

    reply = "554 5.6.0 Error: message refused"
    exit_code = os.EX_DATAERR

    def __init__(self, detail: str, reply: str | None = None) -> None:
        super().__init__(detail)
        if reply is not None:
            self.reply = reply


class MailLoop(Refused):
    """Too many Received: fields: the message is going round in circles."""

    reply = "554 5.4.6 Error: too many hops, a mail loop"


class UnreadableHeader(Refused):
    """With `rewrite.force_from`, a header block in which an upstream might find a From
    field that rewriting did not replace: a line another reader may take for a From
    field and this one does not (text after a bare CR, `From` behind invisible, control
    or 8-bit bytes), or a block not read to its end (longer than `headers.MAX_BLOCK`,
    or cut by the door that received it). Every other doubtful line is rewritten
    around, not refused (see `rewrite.force_header_from`). Without force_from nothing
    is refused for the way the header is written."""

    reply = "554 5.6.0 Error: the message header cannot be read without doubt (force_from)"


def prepare(
    config: Config, env: Envelope, received: bytes, content: bytes, *, complete: bool = True
) -> tuple[Envelope, list[bytes]]:
    """Rewrite the addresses, add Received (and Message-ID and Date where missing).

    `env` carries the envelope as submitted (its id, sender, recipients with their
    DSN parameters, client details); the result is what goes into the spool.
    `content` is the header block alone (SMTP) or the whole message (local); the
    block is read to its empty line, or to `headers.MAX_BLOCK`. `complete=False`: the
    door cut the block short (more header lines follow that are not in `content`).
    Raises Refused: MailLoop, UnreadableHeader.
    """
    header = headers.read(content)
    hops = len(header.find("received"))
    if hops > MAX_HOPS:
        raise MailLoop(f"{hops} Received: fields: a mail loop")
    if config.rewrite.force_from and not complete:
        raise UnreadableHeader("the header block was not received to its end")
    try:
        changed = rewrite(
            config.rewrite,
            config.hostname,
            env.sender,
            [r.address for r in env.recipients],
            content,
            header,
        )
    except HeaderInDoubt as exc:
        raise UnreadableHeader(str(exc)) from None
    if changed.changes:
        log.event("rewritten", queue_id=env.id, changes=changed.changes)
    found = header.fields
    if changed.content is not content:
        grown = max(len(changed.content) - len(content), 0)
        content = changed.content
        found = headers.read(content, headers.MAX_BLOCK + grown).fields
    has_date, message_id = scan_headers(content, found)
    added = [received]
    if message_id is None:
        message_id = f"<{env.id}@{config.hostname}>"
        added.append(f"Message-ID: {message_id}\r\n".encode())
    if not has_date:
        added.append(f"Date: {headers.date_now()}\r\n".encode())
    prefix = b"".join(added)
    recipients = _dedupe(
        [replace(r, address=a) for r, a in zip(env.recipients, changed.recipients)]
    )
    prepared = replace(
        env,
        sender=changed.sender,
        recipients=recipients,
        arrival=time.time(),
        size=len(prefix) + len(content),
        message_id=message_id or None,
    )
    return prepared, [prefix, content]


def _dedupe(recipients: list[Recipient]) -> list[Recipient]:
    """Two addresses aliased to one target get one copy (the first one's parameters)."""
    seen: set[str] = set()
    kept = []
    for rcpt in recipients:
        if rcpt.address.lower() not in seen:
            seen.add(rcpt.address.lower())
            kept.append(rcpt)
    return kept
